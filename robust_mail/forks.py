"""Locks that survive ``fork()``: objects whose ``_lock`` a forked child replaces.

A lock another thread of the parent held at ``fork()`` stays held forever in the child,
where that thread does not exist (gunicorn ``--preload`` forks workers from a process
that may have sent mail). Objects kept across the fork register here, and the child gives
each a fresh ``threading.Lock``: it has a single thread then, so nothing else holds one.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

__all__ = ["renew_lock_after_fork"]

_holders: weakref.WeakSet[Any] = weakref.WeakSet()


def renew_lock_after_fork(holder: Any) -> None:
    """In a forked child, replace ``holder._lock`` with a new lock (``holder`` may die)."""
    _holders.add(holder)


def _after_fork_in_child() -> None:
    for holder in list(_holders):
        holder._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

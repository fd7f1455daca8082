"""Run a function in a forked child, for the fork-safety tests."""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Callable


def in_child(fn: Callable[[], object]) -> int:
    """Run ``fn`` in a forked child that SIGALRM kills if it hangs; the wait status."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() with threads running; that is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        signal.alarm(5)
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]

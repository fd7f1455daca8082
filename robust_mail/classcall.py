"""Service methods callable on the class as well as on an instance.

DESIGN.md's contract spells calls as ``OTPService.issue(...)`` and
``PasswordResetService.initiate(...)``; the services are also instantiated with
a custom config, store or clock (tests, multi-tenant projects). A method marked
``@class_or_instance`` does both: on the class it runs on a fresh default instance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


class class_or_instance:  # lower case: used as a decorator, like classmethod
    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, instance: object, owner: type) -> Any:
        # Typed Any: the bound method's signature (without self) has no spelling here.
        target = owner() if instance is None else instance
        return functools.partial(self.func, target)

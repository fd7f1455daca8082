"""Who may see the operator pages (dashboard, mailboxes, server switches, send).

On the local demo (``EXAMPLE_OPEN_PAGES = True``, bound to 127.0.0.1) they are open so a
person can click through at once. Anywhere else they list recipients and subjects, show
emailed codes or send mail through real providers: staff only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse


def operator_page(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    guarded = staff_member_required(view)

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        # Open only to this machine: a demo started on 0.0.0.0 by mistake must not show
        # its mailboxes (sign-in codes) to the network.
        if getattr(settings, "EXAMPLE_OPEN_PAGES", False) and _from_loopback(request):
            return view(request, *args, **kwargs)
        return guarded(request, *args, **kwargs)

    return wrapper


def _from_loopback(request: HttpRequest) -> bool:
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False

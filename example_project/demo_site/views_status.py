"""The dashboard: providers, outbox and recent deliveries, refreshed by the page itself."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from example_project.demo_site import embedded, status
from example_project.demo_site.access import operator_page


@operator_page
@require_GET
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "demo_site/dashboard.html", _context())


@operator_page
@never_cache
@require_GET
def live(request: HttpRequest) -> HttpResponse:
    """The dashboard's panels alone: the page fetches this every two seconds."""
    return render(request, "demo_site/_panels.html", _context())


@operator_page
@never_cache
@require_GET
def status_json(request: HttpRequest) -> JsonResponse:
    # allow_nan=False: a non-finite number would otherwise go out as Infinity or NaN, which
    # is not JSON (collect() gives none; this keeps it that way).
    return JsonResponse(status.snapshot(), json_dumps_params={"allow_nan": False})


def _context() -> dict[str, object]:
    return {"status": status.snapshot(), "modes": embedded.MODES}

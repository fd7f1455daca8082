"""Send a message; read the local mailboxes; take a local server down and back up."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.mail import EmailMessage
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from example_project.demo_site import embedded, mailbox
from example_project.demo_site.access import operator_page
from example_project.demo_site.forms import SendForm
from example_project.demo_site.status import server_info
from robust_mail import EmailService
from robust_mail.exceptions import InvalidMessage, RobustMailError
from robust_mail.testing import Mode


@operator_page
@login_required
@require_http_methods(["GET", "POST"])
def send(request: HttpRequest) -> HttpResponse:
    """Send one message now (and see which provider took it) or through the outbox."""
    form = SendForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        message = EmailMessage(
            data["subject"], data["body"], settings.DEFAULT_FROM_EMAIL, [data["to"]]
        )
        try:
            result = EmailService.send(message, background=data["delivery"] == "background")
        except InvalidMessage as exc:
            form.add_error(None, str(exc))
        except RobustMailError as exc:  # the fallback could not take it either
            messages.error(request, f"Not sent: {exc}")
            return redirect("demo_site:send")
        else:
            level = messages.SUCCESS if result.ok else messages.ERROR
            text = result.describe()
            if result.outbox_id is not None:
                text += f" (outbox #{result.outbox_id}: the worker delivers it)"
            messages.add_message(request, level, f"{result.message_id}: {text}")
            for error in result.errors:
                messages.warning(request, str(error))
            return redirect("demo_site:send")
    return render(request, "demo_site/send.html", {"form": form})


@operator_page
@require_GET
def mailbox_page(request: HttpRequest) -> HttpResponse:
    return render(request, "demo_site/mailbox.html", {"boxes": _boxes()})


@operator_page
@never_cache
@require_GET
def mailbox_live(request: HttpRequest) -> HttpResponse:
    """The mailboxes alone: the page fetches this every two seconds."""
    return render(request, "demo_site/_mailboxes.html", {"boxes": _boxes()})


def _boxes() -> list[dict[str, object]]:
    return [
        {"server": server_info(server), "messages": mailbox.newest_first(server.messages)}
        for server in embedded.servers()
    ]


@operator_page
@require_POST
def mailbox_clear(request: HttpRequest, name: str) -> HttpResponse:
    _server(name).clear()
    return redirect("demo_site:mailbox")


@operator_page
@require_POST
def server_mode(request: HttpRequest, name: str) -> HttpResponse:
    """Switch a local server's behaviour: ``mode`` is one of :data:`embedded.MODES`."""
    server = _server(name)
    mode = request.POST.get("mode", "")
    if mode not in embedded.MODES:
        return HttpResponseBadRequest("unknown mode")
    server.mode = mode
    if mode in _AT_CONNECTION:
        # These act when a client connects: the web process's and the worker's pooled
        # connections would otherwise go on delivering as if nothing had changed.
        server.drop_connections()
    messages.info(request, f"{server.name} is now {embedded.MODES[mode]}.")
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        target = reverse("demo_site:dashboard")
    return redirect(target)


#: Modes a server shows only to new connections (``refuse`` closes the old ones itself).
_AT_CONNECTION = frozenset({Mode.GREETING_421.value, Mode.BLACKHOLE.value})


def _server(name: str) -> embedded.SMTPTestServer:
    server = embedded.get(name)
    if server is None:
        raise Http404("no such local SMTP server (are the demo servers running?)")
    return server

"""manage.py robust_mail_check: reachability of every provider, nothing sent."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from tests.conftest import needs_mailers, provider


def _check(*args: str) -> tuple[str, CommandError | None]:
    out = StringIO()
    try:
        call_command("robust_mail_check", *args, stdout=out)
    except CommandError as exc:
        return out.getvalue(), exc
    return out.getvalue(), None


def test_healthy_starttls_provider_passes_every_step_and_sends_nothing(smtp_server, robust, certs):
    server = smtp_server(tls="starttls", auth={"user": "s3cret-pw-xyz"})
    robust(
        [
            provider(
                server,
                "primary",
                HOST="localhost",
                USE_TLS=True,
                SSL_CAFILE=certs.ca_file,
                USERNAME="user",
                PASSWORD="s3cret-pw-xyz",
            )
        ]
    )

    out, error = _check()

    assert error is None
    for step in ("resolve", "connect", "greeting", "ehlo", "starttls", "auth"):
        assert any(
            line.split()[:1] == [step] and line.rstrip().endswith("ok") for line in out.splitlines()
        ), step
    assert "over verified TLS" in out
    assert server.messages == []
    assert "s3cret-pw-xyz" not in out


def test_failing_provider_exits_non_zero_and_names_the_step(smtp_server, robust):
    good = smtp_server()
    bad = smtp_server("auth_535", auth={"user": "right"})
    robust([provider(good, "good"), provider(bad, "bad", USERNAME="user", PASSWORD="wrong")])

    out, error = _check()

    assert error is not None and "bad" in str(error)
    assert "auth" in out and "FAILED" in out
    assert "provider_fatal" in out


def test_unknown_provider_name_is_an_error(smtp_server, robust):
    robust([provider(smtp_server(), "only")])

    with pytest.raises(CommandError, match="no such provider"):
        call_command("robust_mail_check", "--provider", "nope", stdout=StringIO())


def _two_aliases(default: list[str], bulk: list[str]) -> dict[str, Any]:
    return {
        "default": {
            "BACKEND": "robust_mail.backends.RobustEmailBackend",
            "OPTIONS": {"providers": default},
        },
        "bulk": {
            "BACKEND": "robust_mail.backends.OutboxEmailBackend",
            "OPTIONS": {"providers": bulk},
        },
    }


@needs_mailers
def test_every_mailers_alias_is_checked(smtp_server, settings):
    good = f"smtp://127.0.0.1:{smtp_server().port}?name=good"
    # The same server in both aliases: checked once.
    settings.MAILERS = _two_aliases([good], [good, "smtp://127.0.0.1:1?name=refused"])

    out, error = _check()

    assert error is not None and "1 provider(s) failed: refused" in str(error)
    lines = out.splitlines()
    assert lines.index("mailer 'default'") < lines.index("mailer 'bulk'")
    assert "good  checked above" in lines
    assert "refused  127.0.0.1:1  plain" in lines and "Connection refused" in out


@needs_mailers
def test_nothing_to_check_is_a_failure_not_a_pass(settings):
    settings.MAILERS = {"default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}}

    out, error = _check()

    assert error is not None and "no provider to check" in str(error)
    assert "reachable" not in out


@needs_mailers
def test_only_aliases_with_a_chosen_provider_get_a_header(smtp_server, settings):
    good = f"smtp://127.0.0.1:{smtp_server().port}?name=good"
    settings.MAILERS = _two_aliases([good], ["smtp://127.0.0.1:1?name=refused"])

    out, error = _check("--provider", "good")

    assert error is None
    assert "mailer 'default'" in out and "mailer 'bulk'" not in out


@needs_mailers
def test_providers_that_all_delegate_are_not_reported_reachable(settings):
    settings.MAILERS = {
        "default": {
            "BACKEND": "robust_mail.backends.RobustEmailBackend",
            "OPTIONS": {"providers": [{"mailer": "api"}]},
        },
        "api": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
    }

    out, error = _check()

    assert error is None  # nothing failed
    assert "delegates to mailer 'api': not checked over SMTP" in out
    assert "no SMTP provider to check" in out and "reachable" not in out


@needs_mailers
def test_a_name_reused_with_another_account_is_checked_again(smtp_server, settings):
    server = smtp_server(auth={"good": "right-pw-123"})
    at = f"127.0.0.1:{server.port}"
    settings.MAILERS = _two_aliases(
        [f"smtp://good:right-pw-123@{at}?name=p"], [f"smtp://bad:wrong-pw-456@{at}?name=p"]
    )

    out, error = _check()

    assert error is not None and "1 provider(s) failed: p" in str(error)
    assert "checked above" not in out

"""``manage.py robust_mail_check``: can each provider be reached? Sends nothing.

For every configured SMTP provider — ``ROBUST_MAIL``'s, and on Django 6.1 every
``MAILERS`` alias robust_mail serves: resolve, connect, greeting, EHLO, STARTTLS, AUTH —
each step timed — then QUIT. Exits with status 1 when any provider fails, or when there
was none to check, so it can gate a deployment.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from robust_mail.conf import RobustMailConfig
from robust_mail.dispatch import resolver_for
from robust_mail.exceptions import RobustMailError, Step, TransportError, classify
from robust_mail.mailers import configurations
from robust_mail.providers import ProviderConfig
from robust_mail.transport import SMTPConnection


class Command(BaseCommand):
    help = "Resolve, connect, EHLO, STARTTLS and AUTH against every provider; send nothing."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--provider", action="append", default=[], help="Check only this provider (repeatable)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        found = configurations()
        wanted = set(options["provider"])
        unknown = wanted - {p.name for _, config in found for p in config.providers}
        if unknown:
            raise CommandError(f"no such provider: {', '.join(sorted(unknown))}")
        checked: dict[str, ProviderConfig] = {}
        delegated: set[str] = set()
        failed: list[str] = []
        for alias, config in found:
            mine = [p for p in config.providers if not wanted or p.name in wanted]
            if alias is not None and mine:
                self.stdout.write(f"mailer {alias!r}")
            for provider in mine:
                # Only the very same provider is skipped: another alias may use the name
                # with other credentials or TLS settings (E012 reports the former).
                if checked.get(provider.name) == provider or provider.name in delegated:
                    self.stdout.write(f"{provider.name}  checked above")
                elif provider.mailer:
                    delegated.add(provider.name)
                    self.stdout.write(
                        f"{provider.name}  delegates to mailer {provider.mailer!r}: "
                        "not checked over SMTP"
                    )
                else:
                    checked[provider.name] = provider
                    if not self._check(provider, config):
                        failed.append(provider.name)
        if failed:
            raise CommandError(f"{len(failed)} provider(s) failed: {', '.join(failed)}")
        if not checked and not delegated:
            raise CommandError(
                "no provider to check: configure ROBUST_MAIL['PROVIDERS'] (or, on Django 6.1, "
                "a MAILERS alias with robust_mail's backend); `manage.py check` says more"
            )
        if not checked:
            # Not a failure: nothing here speaks SMTP for robust_mail. Not a pass either.
            self.stdout.write("no SMTP provider to check: every one delegates to another mailer")
            return
        self.stdout.write(self.style.SUCCESS("every provider checked is reachable"))

    def _check(self, provider: ProviderConfig, config: RobustMailConfig) -> bool:
        security = "SMTPS" if provider.use_ssl else "STARTTLS" if provider.use_tls else "plain"
        user = f"  user={provider.username}" if provider.username else ""
        self.stdout.write(f"{provider.name}  {provider.host}:{provider.port}  {security}{user}")

        def report(step: Step, seconds: float, error: BaseException | None) -> None:
            status = self.style.SUCCESS("ok") if error is None else self.style.ERROR("FAILED")
            detail = "" if error is None else f"  {error}"
            self.stdout.write(f"  {step.value:<9}{seconds * 1000:8.1f} ms  {status}{detail}")

        connection = SMTPConnection(provider, resolver=resolver_for(config.dns), on_step=report)
        try:
            connection.open()
        except TransportError as exc:
            self.stdout.write(f"  -> {classify(exc).value}: {exc}")
            return False
        except RobustMailError as exc:  # pragma: no cover - open() wraps everything it raises
            self.stdout.write(f"  -> {exc}")
            return False
        tls = " over verified TLS" if connection.tls else ""
        self.stdout.write(f"  connected to {connection.address}{tls}")
        connection.close()
        return True

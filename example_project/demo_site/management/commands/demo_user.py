"""``manage.py demo_user``: create the demo's staff account (idempotent)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from example_project.demo_site.accounts import DEMO_EMAIL, ensure_demo_user


class Command(BaseCommand):
    help = "Create the demo staff user (sign in with a code sent by email)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--email", default=DEMO_EMAIL)

    def handle(self, *args: Any, **options: Any) -> None:
        user, created = ensure_demo_user(options["email"])
        verb = "created" if created else "exists"
        self.stdout.write(f"demo user {user.get_username()} {verb}")

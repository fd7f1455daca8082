"""Does ``PasswordResetService.initiate`` take as long for unknown addresses as for known?

    python -m benchmarks.reset_timing            # 400 of each, OTP["NOTIFY_UNKNOWN"] on
    python -m benchmarks.reset_timing 400 off    # the decoy path instead of the notice
    python -m benchmarks.reset_timing 400 inactive  # the "known" accounts are inactive

Known and unknown addresses are asked for in turn (the order alternating), each address
once, so no rate limit fires; the outbox takes the emails and no SMTP is involved. Printed:
the median time of each, their gap, and how often a threshold halfway between the medians
tells a single request's answer right — 50 % is a coin toss. The figures quoted in
docs/otp.md ("Timing") come from this script.
"""

from __future__ import annotations

import os
import statistics
import sys
import time


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 400
    mode = argv[1] if len(argv) > 1 else "notice"
    if mode not in ("notice", "off", "inactive"):
        raise SystemExit(f"unknown mode {mode!r}: notice, off or inactive")
    notify = mode != "off"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test.utils import override_settings

    from robust_mail.otp import PasswordResetService

    call_command("migrate", verbosity=0)
    templates = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
    mail = {
        "PROVIDERS": [{"HOST": "127.0.0.1", "PORT": 1}],  # never used: all goes to the outbox
        "OTP": {
            "MAX_PER_IP_PER_HOUR": 10**6,
            # Counted, never reached: past it unknown addresses take the decoy path.
            "MAX_NOTICES_PER_HOUR": 10**6,
            "NOTIFY_UNKNOWN": notify,
        },
    }
    with override_settings(
        TEMPLATES=templates,
        ROBUST_MAIL=mail,
        EMAIL_BACKEND="robust_mail.backends.RobustEmailBackend",
    ):
        users = get_user_model()
        users.objects.bulk_create(
            users(
                username=f"u{i}",
                email=f"user{i}@example.com",
                password="pbkdf2_sha256$1$a$b",
                # The warm-up accounts stay active: the code email's template is warmed too.
                is_active=not (mode == "inactive" and i < count),
            )
            for i in range(count + 20)
        )
        reset = PasswordResetService()
        for i in range(20):  # warm-up: imports, templates, statement caches
            reset.initiate(f"user{count + i}@example.com")
            reset.initiate(f"warm{i}@example.org")
        known: list[float] = []
        unknown: list[float] = []
        for i in range(count):
            for is_known in (True, False) if i % 2 else (False, True):
                address = f"user{i}@example.com" if is_known else f"nobody{i}@example.org"
                began = time.perf_counter()
                reset.initiate(address)
                (known if is_known else unknown).append(time.perf_counter() - began)
    k, u = statistics.median(known), statistics.median(unknown)
    threshold, known_slower = (k + u) / 2, k > u
    right = sum((t > threshold) == known_slower for t in known)
    right += sum((t > threshold) != known_slower for t in unknown)
    print(
        f"{mode}: known {k * 1000:.3f} ms, unknown {u * 1000:.3f} ms, "
        f"gap {(k - u) * 1000:+.3f} ms; a threshold tells them apart "
        f"{right / (2 * count):.0%} of the time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The prose of docs/performance.md that explains how the figures were measured."""

from __future__ import annotations

from typing import Any

DEAD_PRIMARY = """\
robust_mail with two providers: a dead primary (`TIMEOUT = {timeout:g}` s) and a healthy
backup (aiosmtpd, STARTTLS + AUTH, loopback). *refused*: nothing listens on the primary's
port, so `connect()` fails at once. *blackhole*: the primary accepts TCP and never greets, so
the greeting times out after `TIMEOUT`. Configurations: {variants}.

From a closed breaker, messages are sent one at a time until the primary's breaker is open
(every one of them pays for the dead primary: connect or greeting timeout, retries and their
backoff); then messages are timed while it is open ({shape}), against the same messages sent by
robust_mail configured with the backup alone (repeats interleaved). "Extra until open" is
the time those first messages took beyond the backup's p50 each. "Extra p50" (what the
target is judged on) and "extra mean" compare each run made while the breaker is open with
the backup-alone run made right after it, and give the median of those differences, so that
a slow spell of the machine moves both sides of a pair. The backup's pooled connection is
opened before the first message, so the first message's cost is the dead primary's, not
the backup's handshake."""

OUTBOX_PLACEHOLDER = """\
*Placeholder: the outbox benchmark (issue 4) did not run in this run (`--no-outbox`, or the
outbox is not available).* It measures the request-path cost of enqueueing one message
(p50/p99; target: p99 no worse than django-mailer's in the same run) and the drain
throughput with concurrency (targets: ≥ 2x django-post-office and ≥ 5x django-mailer over
STARTTLS + AUTH; ≥ 4x django-post-office over the 40 ms round trip), against django-mailer
2.3 and django-post-office 3.12 installed only in the benchmark's own virtualenv
(`.venv-bench-peers`)."""


def per_call_note(scenario: Any) -> str:
    return (
        f"{scenario.n_per_call} for Django stock per call; after {scenario.warmup} untimed "
        "warm-up messages"
    )


def render(results: Any) -> list[str]:
    m = results.machine
    delay_ms = results.proxy_delay * 1000
    lines = [
        "## Method",
        "",
        "**Processes.** The benchmark process holds only the client under test. The SMTP "
        "servers run in other processes: three aiosmtpd servers from `robust_mail.testing` "
        "(STARTTLS with a trustme certificate, AUTH PLAIN/LOGIN required, PIPELINING offered "
        "as Gmail, Microsoft 365, SES and Postfix offer it, and CHUNKING in the outbox rows "
        "marked *+ CHUNKING* only; *primary*, *backup*, "
        "and a *blackhole* one) in `python -m benchmarks.servers`; they record each message "
        "without parsing it (a test reads the parsed form on demand), which would otherwise "
        "take about 40 % of their CPU; Postfix's `smtp-sink` "
        "(`smtp-sink 127.0.0.1:PORT 256`); and `python -m benchmarks.latency_proxy` in front "
        f"of the primary, which delays every chunk {delay_ms:g} ms in each direction, keeping "
        f"order (a {2 * delay_ms:g} ms round trip), and holds a new connection "
        f"{3 * delay_ms:g} ms before forwarding it, so a greeting arrives two round trips "
        "after `connect()` as over a real network. Everything listens on 127.0.0.1.",
        "",
        "**smtp-sink.** Postfix's smtp-sink has no TLS at all (it never offers STARTTLS), so "
        "that column is plain SMTP. It offers AUTH but answers it with `250` where RFC 4954 "
        "says `235`, which smtplib (under Django's backend and robust_mail alike) takes as a "
        "failure, so no contender authenticates there. It throws messages away, so deliveries are "
        "not counted there; the aiosmtpd servers count every message and the tables show it.",
        "",
        "**Trust.** The client process trusts the test CA through `SSL_CERT_FILE`, pointing at "
        "the system CA bundle with the test CA appended. Django's stock backend builds a "
        "default SSL context (loading that whole bundle) for every connection, exactly as it "
        "does in production; robust_mail builds one per provider and keeps it.",
        "",
        "**Contenders.** The same ~600-byte text message goes through "
        "`django.core.mail.send_mail` in every case. *Django stock, send_mail per call*: "
        "`EMAIL_BACKEND = 'django.core.mail.backends.smtp.EmailBackend'`, a new connection "
        "(TCP, EHLO, STARTTLS, EHLO, AUTH, … QUIT) per message. *Django stock, one reused "
        "connection*: `get_connection()` opened once by hand and passed as `connection=` to "
        "every call. *robust_mail*: `EMAIL_BACKEND = 'robust_mail.backends.RobustEmailBackend'` "
        "with one provider and default settings, one plain `send_mail` per message; its "
        "process-wide pool keeps the connection, and it sends MAIL, RCPT and DATA in one "
        "write where the server offers PIPELINING (every server here does; Django's backend "
        "and the queueing peers send through smtplib, which waits for each reply). Every "
        "contender runs with `TIMEOUT` 10 s.",
        "",
        "**Loops.** Per cell and repeat: untimed warm-up messages, then a bounded loop of "
        "timed messages, one after another on one thread. Latency: `time.perf_counter()` "
        "around each `send_mail`. Messages/s: timed messages ÷ the loop's wall time. Client "
        "CPU: `time.process_time()` (user + system CPU of the whole benchmark process) over "
        "the loop ÷ messages. Within a repeat the contenders take turns; "
        f"{results.repeats} repeats. Reported: the median over repeats of messages/s (with "
        "the range), of the p50 and of CPU/message; the p99 is taken over every timed message "
        "of every repeat, since a p99 of a few dozen messages would only be the slowest one.",
        "",
        "**Caveats.** Loopback numbers measure the client's and the server's CPU, not a "
        "network: on 2 cores the Python aiosmtpd server (one core) is often the bottleneck of "
        "the reused-connection cases, which then run at the server's pace. The servers keep "
        "running between cells. The benchmark does not stop other work on the machine: the "
        "load average at the start and the end of the run is in the table below, and a busy "
        "machine shows as wide min-max ranges and long p99 tails.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
    ]
    lines += [f"| {key} | {value} |" for key, value in m.items()]
    lines += [
        "",
        "## How to rerun",
        "",
        "```sh",
        "make bench                      # pip install -e '.[bench]', then python -m benchmarks",
        "python -m benchmarks --quick    # smoke run, writes benchmarks/results/ instead of docs/",
        "python -m benchmarks --no-outbox",
        "```",
        "",
        "Postfix's `smtp-sink` comes from Debian's `postfix` package "
        "(`apt-get install postfix`); the benchmark installs nothing itself and leaves that "
        "column out, saying so, when it is missing. The raw figures of the last run are in "
        "`benchmarks/results/latest.json`. The whole run takes a few minutes on 2 cores.",
    ]
    return lines

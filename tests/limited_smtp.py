"""aiosmtpd on 127.0.0.1 with capabilities taken away or replies scripted: ``limited_server``.

:class:`robust_mail.testing.SMTPTestServer` always offers SMTPUTF8 (its SIZE is set by
``size_limit``); tests that need a server lacking what a message needs, or answering MAIL,
RCPT or the final dot with a scripted refusal, start aiosmtpd itself through this fixture
(made available to every test module by conftest).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.ports import BIND_ATTEMPTS, free_port


class _Recorder:
    """aiosmtpd handler: records messages; ``mail_reply`` (e.g. a 552) answers MAIL instead.

    ``rcpt_limit`` recipients per transaction, the rest answered ``452 4.5.3``; recipients
    in ``put_off`` are always answered ``450 4.2.1``; ``later_data_reply`` answers the final
    dot of every transaction after the first.
    """

    def __init__(
        self,
        mail_reply: str | None = None,
        rcpt_limit: int | None = None,
        put_off: tuple[str, ...] = (),
        later_data_reply: str | None = None,
    ) -> None:
        self.mail_reply = mail_reply
        self.later_data_reply = later_data_reply
        self.rcpt_limit = rcpt_limit
        self.put_off = put_off
        self.messages: list[bytes] = []
        self.transactions: list[list[str]] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.put_off:
            return "450 4.2.1 Try again later"
        if self.rcpt_limit is not None and len(envelope.rcpt_tos) >= self.rcpt_limit:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.transactions and self.later_data_reply:
            return self.later_data_reply
        self.messages.append(envelope.original_content)
        self.transactions.append(list(envelope.rcpt_tos))
        return "250 OK"


@pytest.fixture
def limited_server() -> Iterator[Callable[..., Any]]:
    """Start aiosmtpd on 127.0.0.1: ``limited_server(enable_SMTPUTF8=False)`` etc."""
    from aiosmtpd.controller import Controller

    started: list[Any] = []

    def start(
        mail_reply: str | None = None,
        *,
        rcpt_limit: int | None = None,
        put_off: tuple[str, ...] = (),
        later_data_reply: str | None = None,
        **options: Any,
    ) -> Any:
        handler = _Recorder(mail_reply, rcpt_limit, put_off, later_data_reply)
        for attempt in range(BIND_ATTEMPTS):
            # aiosmtpd's Controller needs a port number, not 0: ask for a free one, and ask
            # again if another process takes it before the controller binds it.
            controller = Controller(handler, hostname="127.0.0.1", port=free_port(), **options)
            try:
                controller.start()
            except OSError as exc:
                controller.loop.close()  # its own event loop, made for the server that failed
                if exc.errno != errno.EADDRINUSE or attempt == BIND_ATTEMPTS - 1:
                    raise
                continue
            started.append(controller)
            return controller
        raise AssertionError("unreachable")

    yield start
    for controller in started:
        controller.stop()

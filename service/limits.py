"""Slow clients are cut off: a deadline for the request head and one for the request body.

Two layers, because the head is read before the ASGI app sees the request:

* ``h11_protocol(header_timeout_s)``: uvicorn's h11 protocol with a timer armed when a
  connection opens (and again after each response, for the next request on a kept-alive
  connection) and disarmed once a complete request head has been parsed. If it fires, the
  client gets ``408 Request Timeout`` and the connection is closed. Sending a byte now and then
  does not reset it (uvicorn's keep-alive timer is reset by any data). ``butd serve`` uses it.
* ``BodyDeadline``: ASGI middleware giving each request ``timeout_s`` from its head to the end
  of its body; a ``receive()`` still waiting at the deadline raises ``BodyTimeoutError`` (408,
  the documented error body). A trickling upload is cut off whatever its pace.

Concurrent connections are bounded by uvicorn's ``limit_concurrency`` (``max_connections``):
past it, new requests get 503 at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from butd.service.errors import BodyTimeoutError

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def h11_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with a request-head deadline of ``header_timeout_s``."""

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a complete head was parsed
                self._disarm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
                body = b'{"error": "header_timeout", "detail": "request head not received '
                body += b'within %g s"}' % header_timeout_s
                self.transport.write(_TIMEOUT_RESPONSE % (len(body), body))
            self.transport.close()

    return HeadDeadlineProtocol


class BodyDeadline:
    """ASGI middleware: the whole request body must arrive within ``timeout_s`` of its head.

    Args:
        app: the wrapped application.
        timeout_s: seconds from the start of the request to its last body chunk.
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = anyio.current_time() + self.timeout_s
        complete = False

        async def receive_within() -> Message:
            nonlocal complete
            if complete:  # body read: later receives wait for a disconnect, no deadline
                return await receive()
            try:
                with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                    message: Message = await receive()
            except TimeoutError:
                raise BodyTimeoutError(
                    f"the request body did not arrive within {self.timeout_s:g} s "
                    "(BUTD_BODY_TIMEOUT_S); send it faster or raise the limit",
                    headers={"Connection": "close"},  # the rest of the body is not read
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_within, send)


def uvicorn_limits(settings: Any) -> dict[str, Any]:
    """The ``uvicorn.Config`` keywords that bound connections and slow clients."""
    return {
        "http": h11_protocol(settings.header_timeout_s),
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_s,
    }

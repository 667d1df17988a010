"""Closing connections that send a request too slowly: the server's defence against slow clients.

uvicorn closes a kept-alive connection that sits idle between requests (`timeout_keep_alive`), but it
never times out a request that is still arriving: a connection that opens and sends nothing, trickles its
headers a byte at a time, or sends headers and then a body at a few bytes a second is held for ever, and
each one holds a file descriptor and a buffer. A few are harmless; a few thousand take every descriptor
the process has, and then nobody can connect, `/healthz` included ("slowloris").

This protocol gives each request the allowance of Apache's mod_reqtimeout defaults: the headers must be
complete within `header_timeout` seconds of the request's first byte (or of the connection, for a
connection that sends nothing), and the body within `body_timeout` seconds of the headers plus one second
for every `min_rate` bytes received, so an honest upload on a slow line keeps going while a trickle does
not. A request over its allowance gets `408 Request Timeout` (when no response has started) and its
connection is closed. Time spent answering (the request complete, the model at work) does not count.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 20.0  # for the request line and headers
BODY_TIMEOUT_S = 20.0  # for the body, extended by what arrives:
MIN_RATE = 500  # bytes a second that earn one more second (a 20 MB upload may take up to 11 hours at 500 B/s)
TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"

logger = logging.getLogger("uvicorn.error")


class SlowRequestTimeout(H11Protocol):
    """uvicorn's h11 protocol with a deadline on receiving each request (see the module docstring)."""

    header_timeout = HEADER_TIMEOUT_S
    body_timeout = BODY_TIMEOUT_S
    min_rate = MIN_RATE

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._start(in_body=False)

    def data_received(self, data: bytes) -> None:
        if self._timer is None and self.conn.their_state is h11.IDLE:
            self._start(in_body=False)  # the first byte of the next request on a kept-alive connection
        in_headers = self.conn.their_state is h11.IDLE
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if in_headers:
                self._start(in_body=True)  # headers complete: the body's clock starts
            else:
                self._received += len(data)
        elif state is not h11.IDLE:  # DONE, MUST_CLOSE, CLOSED or ERROR: nothing more to wait for
            self._stop()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        super().connection_lost(exc)

    def _start(self, *, in_body: bool) -> None:
        self._stop()
        self._in_body, self._began, self._received = in_body, self.loop.time(), 0
        self._timer = self.loop.call_later(self._allowance(), self._check)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None

    def _allowance(self) -> float:
        if not self._in_body:
            return self.header_timeout
        return self.body_timeout + self._received / self.min_rate

    def _check(self) -> None:
        self._timer = None
        left = self._began + self._allowance() - self.loop.time()
        if left > 0:  # data arrived since the timer was set: it earned more time
            self._timer = self.loop.call_later(left, self._check)
            return
        if self.transport.is_closing():
            return
        where = "body" if self._in_body else "headers"
        client = "{}:{} - ".format(*self.client) if self.client else ""
        logger.warning("%sclosing a connection whose request %s arrived too slowly", client, where)
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


def protocol(
    header_timeout: float = HEADER_TIMEOUT_S, body_timeout: float = BODY_TIMEOUT_S, min_rate: int = MIN_RATE
) -> type[SlowRequestTimeout]:
    """The protocol class with these limits (uvicorn takes a class)."""
    return type(
        "SlowRequestTimeout",
        (SlowRequestTimeout,),
        {"header_timeout": header_timeout, "body_timeout": body_timeout, "min_rate": min_rate},
    )


def uvicorn_config(
    app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **limits: Any
):
    """The uvicorn configuration `captioner serve` runs: the app behind SlowRequestTimeout."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=protocol(**limits), log_level=log_level)

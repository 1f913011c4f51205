"""Bounded connections: uvicorn's HTTP protocol with a deadline for each request to arrive whole, and the server
settings that bound concurrency and idle time.

uvicorn closes a keep-alive connection that stays idle after an answer (`timeout_keep_alive`), but a connection
that opens and never sends a request, or sends half of its head or of its body, stays open for ever: 200 of them
stayed open indefinitely. Here a connection must deliver a whole request within REQUEST_TIMEOUT_S of opening, or of
its previous answer, or it is closed.
"""
from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_TIMEOUT_S = 30.0  # a whole request (head and body) arrives within this: a 20 MiB upload at 5.6 Mbit/s
KEEP_ALIVE_S = 5  # an idle connection after an answer is closed after this (uvicorn's default)
MAX_CONCURRENCY = 64  # connections and requests at once; beyond, requests are answered 503 at once
MAX_HEAD_BYTES = 16 << 10  # a request head (line and headers) larger than this is refused with 400


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol whose connections must deliver each whole request within `request_timeout_s`."""

    request_timeout_s = REQUEST_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the request is whole (or the connection is ending): the app has it now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request, on a kept-alive connection, gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()


def server_config(app, host: str, port: int) -> uvicorn.Config:
    """uvicorn's settings for `app`, connections bounded as above (README, "Search from a web page")."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=DeadlineH11Protocol,
                          timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=MAX_CONCURRENCY,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES)


def run_server(app, host: str, port: int) -> None:
    uvicorn.Server(server_config(app, host, port)).run()

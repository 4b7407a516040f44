"""Run the app on a socket of our own: TCP_NODELAY, a header read timeout, the default allowed hosts.

    sock = listen("127.0.0.1", 8000)                  # bound here so that --port 0 can say which port it got
    run(app, sock, header_timeout=10.0)               # uvicorn on that socket

``listen`` creates the socket with ``IPPROTO_TCP`` (asyncio sets TCP_NODELAY on every accepted
connection only then: with protocol 0, each keep-alive request waited ~40 ms on Nagle + delayed ACK).
``run`` gives uvicorn an HTTP/1.1 protocol that closes a connection whose request line and headers have
not all arrived ``header_timeout`` seconds after it opened or after its previous response (idle or
half-open connections, slow-header clients); the body deadline is the app's (``ServeConfig.body_timeout_s``).
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

# Deferred imports (inside functions), for start-up time: h11, uvicorn, uvicorn.protocols.http.h11_impl
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["default_allowed_hosts", "listen", "run"]


def listen(host: str, port: int) -> socket.socket:
    """A bound TCP socket (IPv6 when ``host`` has a colon) with TCP_NODELAY; ValueError on a bad port,
    OSError when the address cannot be bound."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"expected a TCP port in 0..65535, received --port {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(host: str) -> tuple[str, ...] | None:
    """The Host header values to answer when ``--allowed-hosts`` is not given: the bound host, plus
    localhost, 127.0.0.1 and ::1 when it is a loopback address; None (any) when bound to every interface."""
    if host in ("0.0.0.0", "::", ""):
        return None
    hosts = [host.lower()]
    if _is_loopback(host):
        hosts += ["localhost", "127.0.0.1", "::1"]
    return tuple(dict.fromkeys(hosts))


def _timed_protocol(header_timeout: float) -> type:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        """uvicorn's h11 protocol, closing a connection whose request headers do not arrive in time."""

        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # nothing answered: the client never finished asking

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on this keep-alive connection gets the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutH11


def run(app: Any, sock: socket.socket, *, header_timeout: float = 10.0, keep_alive: float = 5.0) -> None:
    """Serve ``app`` with uvicorn on ``sock`` until interrupted."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                            http=_timed_protocol(header_timeout), timeout_keep_alive=keep_alive)
    uvicorn.Server(config).run(sockets=[sock])

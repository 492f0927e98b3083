"""The stand-in's HTTP plumbing: requests and responses as values, the threaded server.

Nothing here knows sFOX: :class:`_Handler` reads a request, hands it to
``FakeSfox._handle`` and writes back what that returns.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from .faults import _MAX_BODY, _default_message

if TYPE_CHECKING:
    from .server import FakeSfox


@dataclass
class _Request:
    method: str
    path: str
    ip: str
    headers: dict[str, str]
    body: bytes
    #: When it arrived (monotonic), before any latency or delay.
    arrived: float = 0.0


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    reset: bool = False


def _json_response(status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> _Response:
    return _Response(status, json.dumps(payload).encode(), list(headers))


def _error(status: int, message: str | None = None) -> _Response:
    return _json_response(status, {"error": message or _default_message(status)})


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()


def _parse_json(body: bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False, None


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Many worker threads connect at once; the default backlog of 5 turns bursts into
    # SYN retries that look like latency that sFOX never had.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], fake: FakeSfox) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-request (timeouts in the tests) are expected, not news.
        if self.fake.config.verbose:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, like the real API behind its load balancer; clients reuse pooled connections.
    protocol_version = "HTTP/1.1"
    server_version = "FakeSfox/1.0"
    # Bounds how long an idle keep-alive connection pins a handler thread.
    timeout = 30

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; with Nagle on, the client's delayed ACK
        # adds ~40 ms to every response, which would swamp the benchmark's latency setting.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _fake(self) -> FakeSfox:
        return cast(_Server, self.server).fake

    def log_message(self, format: str, *args: Any) -> None:
        if self._fake().config.verbose:
            super().log_message(format, *args)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline(1024).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > _MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > _MAX_BODY:
            raise ValueError("bad content length")
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._write(_error(400, "unreadable request body"))
            return
        request = _Request(
            method=self.command,
            path=urlsplit(self.path).path or "/",
            ip=str(self.client_address[0]),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        self._write(self._fake()._handle(request))

    # Every method goes through one dispatcher, which answers 404 or 405 as sFOX would.
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def _write(self, response: _Response) -> None:
        if response.reset:
            self._abort()
            return
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", "application/json")
            for name, value in response.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
        except OSError:  # the client gave up (e.g. its read timeout fired during a delay)
            self.close_connection = True

    def _abort(self) -> None:
        # Half a status line guarantees the client cannot parse a response out of it, and
        # SO_LINGER 0 turns the server's close into an RST: the client sees a connection error.
        self.close_connection = True
        try:
            self.wfile.write(b"HTTP/1.1 2")
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass

"""A tiny HTTP/1.1 server for /metrics, /healthz and /readyz on a local port.

Not a web framework: GET (and HEAD) of a few fixed paths, one request per
connection, ``Connection: close``. h11 is not a dependency, so the request head
is parsed here, strictly and with bounds: at most ``max_request_bytes`` of head,
``timeout`` seconds to send it and to take the answer, ``max_connections`` at
once (more get 503). Anything malformed gets 400 and the server keeps serving;
nothing a client sends escapes :meth:`HttpServer.handle`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
import trio

from qpc_node.ops.config import parse_hostport
from qpc_node.ops.log import get_logger
from qpc_node.ops.metrics import NodeMetrics

log = get_logger("qpc.ops.http")

DEFAULT_METRICS_PORT = 9201
MAX_REQUEST_BYTES = 8 * 1024
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 16
RECEIVE_CHUNK = 4096
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024
"""After answering, read and drop at most this much of what the client still sends
before closing: closing on unread bytes makes the kernel send RST, which can destroy
the answer (an error for an oversize request) before the client reads it."""

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

TEXT = "text/plain; charset=utf-8"


class Response(msgspec.Struct, frozen=True):
    status: int
    body: bytes = b""
    content_type: str = TEXT


Route = Callable[[], Awaitable[Response]]


class BadRequest(Exception):
    """The client's bytes are not a request we serve; carries the status to answer."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class Request(msgspec.Struct, frozen=True):
    method: str
    path: str


def parse_request_head(head: bytes) -> Request:
    """Request line and header fields (RFC 9112), without the final CRLFCRLF."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "request line is not METHOD SP TARGET SP VERSION")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest(400, "bad method")
    if not _TARGET.fullmatch(target):
        raise BadRequest(400, "target must be an absolute path")
    v = _VERSION.fullmatch(version)
    if v is None:
        raise BadRequest(400, "bad HTTP version")
    if v.group(1) != b"1":
        raise BadRequest(505, "only HTTP/1.x")
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise BadRequest(400, "malformed header field")
    path = target.split(b"?", 1)[0].decode("ascii")  # the regex admits ASCII only
    return Request(method.decode("ascii"), path)


def render(response: Response, *, head_only: bool = False, extra: str = "") -> bytes:
    reason = _REASONS.get(response.status, "")
    head = (
        f"HTTP/1.1 {response.status} {reason}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + response.body


class _HttpCounters(msgspec.Struct):
    """The live counters; ``statistics()`` hands out a frozen copy."""

    connections: int = 0
    responses: int = 0
    bad_requests: int = 0
    timeouts: int = 0
    refused_busy: int = 0
    client_gone: int = 0
    route_errors: int = 0


class HttpStatistics(msgspec.Struct, frozen=True):
    connections: int
    responses: int
    bad_requests: int
    timeouts: int
    refused_busy: int
    client_gone: int
    route_errors: int


class HttpServer:
    """Serves ``routes`` (path -> async handler). ``addresses`` is set once bound."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        timeout: float = REQUEST_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.routes = dict(routes)
        self.max_request_bytes = max_request_bytes
        self.timeout = timeout
        self._slots = trio.CapacityLimiter(max_connections)
        self.addresses: list[tuple[str, int]] = []
        self._stats = _HttpCounters()

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def statistics(self) -> HttpStatistics:
        s = self._stats
        return HttpStatistics(
            connections=s.connections,
            responses=s.responses,
            bad_requests=s.bad_requests,
            timeouts=s.timeouts,
            refused_busy=s.refused_busy,
            client_gone=s.client_gone,
            route_errors=s.route_errors,
        )

    async def handle(self, stream: trio.abc.Stream) -> None:
        """One connection: one request, one answer, close."""
        self._stats.connections += 1
        try:
            async with stream:
                try:
                    self._slots.acquire_nowait()
                except trio.WouldBlock:
                    self._stats.refused_busy += 1
                    await self._send(stream, render(Response(503, b"busy\n")))
                    return
                try:
                    await self._serve(stream)
                finally:
                    self._slots.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._stats.client_gone += 1

    async def _serve(self, stream: trio.abc.Stream) -> None:
        head: bytes | None = None
        try:
            with trio.move_on_after(self.timeout):
                head = await self._read_head(stream)
            if head is None:
                self._stats.timeouts += 1
                await self._send(stream, render(Response(408, b"request timeout\n")))
                return
            request = parse_request_head(head)
        except BadRequest as exc:
            self._stats.bad_requests += 1
            await self._send(stream, render(Response(exc.status, f"{exc}\n".encode())))
            return
        if request.method not in ("GET", "HEAD"):
            self._stats.bad_requests += 1
            answer = render(Response(405, b"GET only\n"), extra="Allow: GET, HEAD\r\n")
            await self._send(stream, answer)
            return
        route = self.routes.get(request.path)
        if route is None:
            response = Response(404, b"not found\n")
        else:
            try:
                response = await route()
            # Supervisor boundary: a faulty collector (later layers register their
            # own) costs one scrape a 500, never the node that serves the endpoint.
            except Exception:
                log.exception("metrics route %s failed", request.path)
                self._stats.route_errors += 1
                response = Response(500, b"internal error\n")
        await self._send(stream, render(response, head_only=request.method == "HEAD"))

    async def _read_head(self, stream: trio.abc.Stream) -> bytes:
        """Bytes up to the blank line; raises BadRequest past the cap or at early EOF."""
        buf = bytearray()
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return bytes(buf[:end])
            if len(buf) > self.max_request_bytes:
                raise BadRequest(431, "request head too large")
            data = await stream.receive_some(RECEIVE_CHUNK)
            if not data:
                raise BadRequest(400, "connection closed before the request ended")
            buf += data

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> None:
        with trio.move_on_after(self.timeout) as scope:
            await stream.send_all(data)
        if scope.cancelled_caught:
            self._stats.timeouts += 1
            return
        self._stats.responses += 1
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
            await _linger(stream)


async def _linger(stream: trio.abc.Stream) -> None:
    """Drain the client's leftovers, bounded in time and bytes (see LINGER_BYTES)."""
    left = LINGER_BYTES
    with trio.move_on_after(LINGER_SECONDS):
        while left > 0:
            data = await stream.receive_some(min(RECEIVE_CHUNK, left))
            if not data:
                return
            left -= len(data)


async def serve_http(
    listen: str,
    server: HttpServer,
    *,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind ``listen`` (HOST:PORT, port 0 picks one) and serve until cancelled."""
    host, port = parse_hostport(listen, default_port=DEFAULT_METRICS_PORT)
    listeners = await trio.open_tcp_listeners(port, host=host)
    server.addresses = [_bound(lst) for lst in listeners]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        log.info("metrics serving", extra={"addr": f"{host}:{server.port}"})
        task_status.started(server)


def _bound(listener: trio.SocketListener) -> tuple[str, int]:
    name: Any = listener.socket.getsockname()
    return str(name[0]), int(name[1])


def metrics_routes(metrics: NodeMetrics) -> dict[str, Route]:
    """/metrics (Prometheus text), /healthz (alive: 200), /readyz (200 or 503)."""
    # Imported when metrics are served: a node with metrics off never loads prometheus_client.
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    async def scrape() -> Response:
        await metrics.refresh()
        return Response(200, metrics.exposition(), CONTENT_TYPE_LATEST)

    async def healthz() -> Response:
        return Response(200, b"ok\n")

    async def readyz() -> Response:
        if metrics.ready():
            return Response(200, b"ready\n")
        return Response(503, b"not ready\n")

    return {"/metrics": scrape, "/healthz": healthz, "/readyz": readyz}


async def serve_metrics(
    listen: str,
    metrics: NodeMetrics,
    *,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """What the node starts: ``await nursery.start(serve_metrics, cfg.metrics.listen, m)``."""
    await serve_http(listen, HttpServer(metrics_routes(metrics)), task_status=task_status)

"""Server side of a call: read one Request, run its handler, write one Response.

The transport hands us each peer-initiated bidirectional stream with the
per-connection state it belongs to (``ServerConnection``). Everything a peer
can get wrong -- oversize or truncated frames, garbage protobuf, unknown
versions or methods, too many calls at once, resets mid-call -- ends in a
typed error Response (when the stream still allows one) and a closed stream;
nothing a peer sends escapes ``handle_stream``.

Memory a peer decides the size of is budgeted node-wide and per source IP
(``rpc.budget``): request frames from the moment their length is known until
their handler is done, response frames until the peer took them -- which it
must within ``send_timeout``, or the stream is reset. A handler whose answer
can be large reserves it earlier, before reading what it answers
(``ctx.answer``); the frame then takes that reservation over. Over a budget the
call is refused RESOURCE_EXHAUSTED; nothing waits for room while holding bytes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import msgspec
import trio
from google.protobuf.message import DecodeError, Message

from qpc_node.errors import (
    ConfigError,
    LocalProtocolError,
    QpcError,
    RemoteProtocolError,
    StatusCode,
)
from qpc_node.rpc.budget import BudgetStatistics, ByteBudget
from qpc_node.rpc.context import AnswerOverBudget, CallContext, PeerInfo, Session
from qpc_node.rpc.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    encode_frame,
    encode_frame_header,
    encode_varint,
)
from qpc_node.rpc.methods import Method, MethodTable
from qpc_node.rpc.protocol import (
    WIRE_VERSION,
    check_version,
    error_response,
    valid_correlation_id,
)
from qpc_node.wire.gen.qpc.v1 import rpc_pb2

log = logging.getLogger("qpc_node.rpc.server")

RECEIVE_CHUNK = 64 * 1024
"""Largest read; bounds what a decoder holds beyond the frame it is assembling."""

CallObserver = Callable[[str, str, float], None]
"""``observer(method, status, seconds)`` after each dispatched call (metrics hook).

Called only for registered methods (the name set is bounded: an attacker
cannot mint label values); ``status`` is the StatusCode name, CANCELLED when
the caller went away; ``seconds`` runs from the decoded request to the answer.
Must be cheap and must not raise.
"""

# What a broken or reset stream raises; StreamReset is a RemoteProtocolError.
_STREAM_GONE = (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError)


class ServerConfig(msgspec.Struct, frozen=True):
    """Limits; defaults follow the policy (5 MiB frames) and a router's memory."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_concurrent_calls: int = 32
    """Per connection; calls beyond it are refused with RESOURCE_EXHAUSTED, not queued."""
    default_timeout: float = 30.0
    """Used when the caller sent no deadline."""
    max_timeout: float = 60.0
    """Cap on any caller's deadline unless the method sets its own."""
    read_timeout: float = 10.0
    """Time a peer gets to deliver its request frame (slow senders hold a call slot)."""
    send_timeout: float = 30.0
    """Time a response gets to reach the peer once it is ready; then the stream is reset.

    The peer's flow control decides how fast we may send: without this, a peer
    that never reads would hold the response, its call slot and its task forever.
    """
    request_budget: int = 24 * 1024 * 1024
    """Node-wide request bytes held (frames being read, requests being handled)."""
    request_budget_per_ip: int = 8 * 1024 * 1024
    """One remote IP's (IPv6: /64's) share of ``request_budget``."""
    send_budget: int = 24 * 1024 * 1024
    """Node-wide response bytes waiting for peers' flow control."""
    send_budget_per_ip: int = 8 * 1024 * 1024
    """One remote IP's (IPv6: /64's) share of ``send_budget``."""
    budget_floor: int = 64 * 1024
    """Frames up to this size always fit a budget (and are counted): see ``rpc.budget``."""

    def __post_init__(self) -> None:
        for name, share in (
            ("request_budget_per_ip", self.request_budget_per_ip),
            ("send_budget_per_ip", self.send_budget_per_ip),
        ):
            if share < self.max_frame_size + 8:
                raise ConfigError(
                    f"{name} ({share}) must hold one frame of max_frame_size "
                    f"({self.max_frame_size}) or such calls could never succeed"
                )
        if self.send_timeout <= 0 or self.read_timeout <= 0:
            raise ConfigError("send_timeout and read_timeout must be > 0")


def budget_source(peer: PeerInfo) -> str:
    """The key a peer's bytes are budgeted under: its IP; an IPv6 /64 as one.

    One host on a mesh may hold a whole /64 (SLAAC privacy addresses), so
    per-address shares would be no limit there. Without an address (in-memory
    transports) the connection is its own source.
    """
    addr = peer.remote_address[0] if peer.remote_address else None
    if not isinstance(addr, str):
        return peer.connection_id
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ServerConnection:
    """Per-connection state: the peer, its session, its call-slot count."""

    def __init__(self, peer: PeerInfo, limit: int) -> None:
        self.peer = peer
        self.source = budget_source(peer)
        self.session = Session()
        self._limit = limit
        self.active_calls = 0
        self.peak_active_calls = 0
        self.calls = 0
        self.refused_calls = 0
        self._next_local_id = 0

    def statistics(self) -> ConnectionCallStatistics:
        return ConnectionCallStatistics(
            connection_id=self.peer.connection_id,
            active_calls=self.active_calls,
            peak_active_calls=self.peak_active_calls,
            calls=self.calls,
            refused_calls=self.refused_calls,
            limit=self._limit,
        )


class ConnectionCallStatistics(msgspec.Struct, frozen=True):
    """One connection's call slots (a snapshot)."""

    connection_id: str
    active_calls: int
    peak_active_calls: int
    calls: int
    refused_calls: int
    limit: int


class _ServerCounters(msgspec.Struct):
    """The live counters; ``statistics()`` hands out a frozen copy."""

    connections: int = 0
    streams: int = 0
    active_calls: int = 0
    refused_calls: int = 0
    peer_resets: int = 0
    protocol_errors: int = 0
    internal_errors: int = 0
    request_budget_refusals: int = 0
    send_budget_refusals: int = 0
    send_timeouts: int = 0
    """Responses the peer did not take within ``send_timeout``: stream reset."""
    statuses: Counter[str] = msgspec.field(default_factory=Counter)


class ServerStatistics(msgspec.Struct, frozen=True):
    """Counters a REPL, test or the metrics layer reads; ``buffered_bytes`` is the
    memory to watch. A snapshot: later calls do not change it."""

    connections: int
    streams: int
    active_calls: int
    refused_calls: int
    peer_resets: int
    protocol_errors: int
    internal_errors: int
    buffered_bytes: int
    """Request bytes held under the request budget (what ``request_budget`` caps)."""
    peak_buffered_bytes: int
    send_queued_bytes: int
    """Response bytes held under the send budget (waiting for peers' flow control)."""
    peak_send_queued_bytes: int
    request_budget_refusals: int
    send_budget_refusals: int
    send_timeouts: int
    """Responses the peer did not take within ``send_timeout``: stream reset."""
    statuses: Mapping[str, int]
    """Responses by StatusCode name, including pre-dispatch refusals (read-only)."""


class _CallState:
    """What the peer watcher learned while the handler ran."""

    __slots__ = ("peer_gone", "violation")

    def __init__(self) -> None:
        self.peer_gone = False
        self.violation: RemoteProtocolError | None = None


class _OverBudget(QpcError):
    """A request frame that does not fit the node's request budget."""

    code = StatusCode.RESOURCE_EXHAUSTED


class RpcServer:
    """Dispatches calls to a MethodTable under per-call deadlines and per-connection limits."""

    def __init__(
        self,
        methods: MethodTable,
        config: ServerConfig | None = None,
        *,
        observer: CallObserver | None = None,
    ) -> None:
        self.methods = methods
        self.config = cfg = config or ServerConfig()
        self.observer = observer
        self._stats = _ServerCounters()
        self._requests = ByteBudget(
            cfg.request_budget, cfg.request_budget_per_ip, floor=cfg.budget_floor
        )
        self._sends = ByteBudget(cfg.send_budget, cfg.send_budget_per_ip, floor=cfg.budget_floor)

    def statistics(self) -> ServerStatistics:
        s = self._stats
        req, snd = self._requests.statistics(), self._sends.statistics()
        return ServerStatistics(
            connections=s.connections,
            streams=s.streams,
            active_calls=s.active_calls,
            refused_calls=s.refused_calls,
            peer_resets=s.peer_resets,
            protocol_errors=s.protocol_errors,
            internal_errors=s.internal_errors,
            buffered_bytes=req.used,
            peak_buffered_bytes=req.peak,
            send_queued_bytes=snd.used,
            peak_send_queued_bytes=snd.peak,
            request_budget_refusals=s.request_budget_refusals,
            send_budget_refusals=s.send_budget_refusals,
            send_timeouts=s.send_timeouts,
            statuses=MappingProxyType(dict(s.statuses)),
        )

    def budgets(self) -> tuple[BudgetStatistics, BudgetStatistics]:
        """(request budget, send budget) as they stand."""
        return self._requests.statistics(), self._sends.statistics()

    def open_connection(self, peer: PeerInfo) -> ServerConnection:
        """State for a new transport connection; pass it with each of its streams."""
        self._stats.connections += 1
        return ServerConnection(peer, self.config.max_concurrent_calls)

    async def handle_stream(
        self, conn: ServerConnection, stream: trio.abc.HalfCloseableStream
    ) -> None:
        """Serve one call on ``stream``; returns when the stream is finished with."""
        self._stats.streams += 1
        if conn.active_calls >= self.config.max_concurrent_calls:
            conn.refused_calls += 1
            self._stats.refused_calls += 1
            # Answer without reading: the refusal costs no buffer.
            refusal = error_response(
                StatusCode.RESOURCE_EXHAUSTED,
                f"too many concurrent calls on this connection "
                f"(limit {self.config.max_concurrent_calls})",
            )
            await self._send(stream, conn.source, *self._prepare(conn.source, refusal))
            return
        conn.active_calls += 1
        conn.calls += 1
        conn.peak_active_calls = max(conn.peak_active_calls, conn.active_calls)
        self._stats.active_calls += 1
        try:
            await self._serve_call(conn, stream)
        finally:
            conn.active_calls -= 1
            self._stats.active_calls -= 1

    # -- one call -----------------------------------------------------------

    async def _serve_call(
        self, conn: ServerConnection, stream: trio.abc.HalfCloseableStream
    ) -> None:
        held = _Held(self._requests, conn.source)
        answer = _Answer(
            self._sends, conn.source, self.config.budget_floor, self.config.max_frame_size
        )
        try:
            try:
                reply = await self._receive_and_dispatch(conn, stream, held, answer)
            finally:
                held.release()  # the request and its decoded form are gone by now
            if reply is None:
                return
            frame, reserved = self._prepare(conn.source, reply, answer)
        finally:
            answer.shrink(0)  # what the handler reserved and the frame did not take
        del reply  # the frame is all we keep while the peer takes its time
        await self._send(stream, conn.source, frame, reserved, request_read=held.whole)

    async def _receive_and_dispatch(
        self,
        conn: ServerConnection,
        stream: trio.abc.HalfCloseableStream,
        held: _Held,
        answer: _Answer,
    ) -> _Reply | None:
        """The call up to its answer (None: nothing to answer, the stream is done)."""
        decoder = FrameDecoder(self.config.max_frame_size)
        frame: bytes | None = None
        timed_out = False
        try:
            # A request already here whole needs no read timer (QUIC streams say so
            # without waiting); otherwise the peer gets read_timeout to deliver it.
            nowait = getattr(stream, "receive_nowait", None)
            if callable(nowait):
                while frame is None and (data := nowait(RECEIVE_CHUNK)) is not None:
                    frame = self._feed_request(data, decoder, held)
            if frame is None:
                with trio.move_on_after(self.config.read_timeout) as read_scope:
                    frame = await self._read_request(stream, decoder, held)
                timed_out = read_scope.cancelled_caught
        except _OverBudget as exc:
            self._stats.request_budget_refusals += 1
            return error_response(exc.code, exc.message)
        except RemoteProtocolError as exc:  # the decoder's verdict on the peer's bytes
            self._stats.protocol_errors += 1
            return error_response(exc.code, exc.message)
        except _STREAM_GONE:
            self._stats.peer_resets += 1
            await trio.aclose_forcefully(stream)
            return None
        del decoder  # what it held is in ``frame`` now (or refused)
        if timed_out or frame is None:
            return error_response(StatusCode.DEADLINE_EXCEEDED, "request not received in time")
        held.whole = True  # the caller has nothing more to send but its end of stream
        # Handed over, not shared: _dispatch drops the frame once parsed.
        parts, frame = [frame], None
        response = await self._dispatch(conn, stream, parts, answer)
        if response is None:  # the peer went away; nobody to answer
            self._stats.peer_resets += 1
            await self._abort(stream)
        return response

    async def _read_request(
        self, stream: trio.abc.HalfCloseableStream, decoder: FrameDecoder, held: _Held
    ) -> bytes | None:
        while True:
            frame = self._feed_request(await stream.receive_some(RECEIVE_CHUNK), decoder, held)
            if frame is not None:
                return frame

    def _feed_request(
        self, data: bytes | bytearray, decoder: FrameDecoder, held: _Held
    ) -> bytes | None:
        """One chunk of the request stream: the request frame once it is whole."""
        if not data:
            decoder.close()  # raises on a partial frame (and drops it)
            raise RemoteProtocolError(
                "stream ended without a request", code=StatusCode.INVALID_ARGUMENT
            )
        frames = decoder.feed(data)
        # Budget the whole frame as soon as its length is known (one
        # reservation per call): refusing then costs at most one chunk.
        announced = decoder.announced_frame_size
        if announced is None and frames:
            announced = len(frames[0])
        if announced is not None and not held.nbytes and not held.reserve(announced):
            raise _OverBudget(
                f"node is holding too many request bytes; retry later (frame of {announced} bytes)"
            )
        if not frames:
            return None
        if len(frames) > 1 or decoder.buffered_bytes:
            raise RemoteProtocolError(
                "more than one frame on a call stream", code=StatusCode.INVALID_ARGUMENT
            )
        return frames[0]

    async def _dispatch(
        self,
        conn: ServerConnection,
        stream: trio.abc.HalfCloseableStream,
        parts: list[bytes],
        answer: _Answer,
    ) -> _Reply | None:
        """Decode the call in ``parts`` (the frame, taken out) and run its handler.

        A 5 MiB request exists as frame, Request and decoded body in turn; only the
        body stays while the handler runs (the request budget still counts it).
        """
        request = rpc_pb2.Request()
        try:
            request.ParseFromString(parts.pop())  # the frame is freed once parsed
        except DecodeError:
            self._stats.protocol_errors += 1
            return error_response(StatusCode.INVALID_ARGUMENT, "request frame is not a Request")
        call_id = request.call_id
        try:
            check_version(request.version)
        except RemoteProtocolError as exc:
            self._stats.protocol_errors += 1
            return error_response(exc.code, exc.message, call_id=call_id)
        method = self.methods.get(request.method)
        if method is None:
            return error_response(
                StatusCode.UNIMPLEMENTED, f"unknown method {request.method!r}", call_id=call_id
            )
        if request.correlation_id and not valid_correlation_id(request.correlation_id):
            return error_response(
                StatusCode.INVALID_ARGUMENT, "malformed correlation_id", call_id=call_id
            )
        body = method.request_type()
        try:
            body.ParseFromString(request.body)
        except DecodeError:
            return error_response(
                StatusCode.INVALID_ARGUMENT,
                f"body is not a {method.request_type.DESCRIPTOR.full_name}",
                call_id=call_id,
            )
        cap = method.max_timeout if method.max_timeout is not None else self.config.max_timeout
        timeout = request.deadline_ms / 1000 if request.deadline_ms else self.config.default_timeout
        correlation_id = request.correlation_id or f"{conn.peer.connection_id}/{call_id}"
        del request  # its body is decoded; the handler needs only that
        ctx = CallContext(
            method=method.name,
            call_id=call_id,
            correlation_id=correlation_id,
            deadline=trio.current_time() + min(timeout, cap),
            peer=conn.peer,
            session=conn.session,
            answer=answer,
        )
        # -- metrics hook (observer): per-method status and latency --
        started = trio.current_time()
        response = await self._run_handler(method, body, ctx, stream)
        if self.observer is not None:
            status = "CANCELLED" if response is None else StatusCode(response.status).name
            self.observer(method.name, status, trio.current_time() - started)
        return response

    async def _run_handler(
        self,
        method: Method[Any, Any],
        body: Message,
        ctx: CallContext,
        stream: trio.abc.HalfCloseableStream,
    ) -> _Reply | None:
        state = _CallState()
        response: _Reply | None = None
        watch = getattr(stream, "watch_receive", None)
        if callable(watch):
            # QUIC streams report what arrives without a task parked in receive_some;
            # one scope serves both the deadline and the peer (told apart by the flag).
            peer_moved = False
            with trio.move_on_at(ctx.deadline) as deadline_scope:

                def on_peer() -> None:
                    nonlocal peer_moved
                    peer_moved = True
                    deadline_scope.cancel()

                unwatch = watch(on_peer)
                try:
                    response = await self._invoke(method, body, ctx)
                finally:
                    unwatch()
            if peer_moved:
                await _peer_verdict(stream, state)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_peer, stream, state, nursery.cancel_scope)
                with trio.move_on_at(ctx.deadline) as deadline_scope:
                    response = await self._invoke(method, body, ctx)
                nursery.cancel_scope.cancel()
        if state.violation is not None:
            self._stats.protocol_errors += 1
            return error_response(
                state.violation.code, state.violation.message, call_id=ctx.call_id
            )
        if state.peer_gone:
            return None
        if deadline_scope.cancelled_caught:
            return error_response(
                StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", call_id=ctx.call_id
            )
        return response

    async def _invoke(self, method: Method[Any, Any], body: Message, ctx: CallContext) -> _Reply:
        try:
            result = await method.handler(body, ctx)
            if not isinstance(result, method.response_type):
                raise TypeError(
                    f"handler returned {type(result).__name__}, not {method.response_type.__name__}"
                )
            payload = result.SerializeToString()
            del result  # a Fetch answer can be 5 MiB: one copy at a time
        except AnswerOverBudget as exc:
            self._stats.send_budget_refusals += 1
            return error_response(exc.code, exc.message, call_id=ctx.call_id)
        except QpcError as exc:
            return error_response(exc.code, exc.message, call_id=ctx.call_id)
        except Exception:  # deliberately broad (BLE001): the one handler boundary.
            # The handler boundary: a bug in one handler must answer INTERNAL and
            # keep the node serving; the peer learns only the correlation id.
            self._stats.internal_errors += 1
            log.exception("handler %s failed [%s]", ctx.method, ctx.correlation_id)
            return error_response(
                StatusCode.INTERNAL,
                f"internal error (correlation id {ctx.correlation_id})",
                call_id=ctx.call_id,
            )
        # Not a Response(body=payload): that would copy the payload once more, and
        # serializing it again for the frame a third time (see ``_OkReply``).
        return _OkReply(ctx.call_id, payload)

    # -- ending a stream ----------------------------------------------------

    def _prepare(
        self, source: str, response: _Reply, answer: _Answer | None = None
    ) -> tuple[list[bytes], int]:
        """Encode ``response`` and reserve its bytes in the send budget:
        (frame as header + payload, reserved bytes).

        What the handler reserved through ``ctx.answer`` (before it read what it
        answers) is taken over first; only a shortfall is reserved here.

        A response that does not fit the budget is replaced by a small
        RESOURCE_EXHAUSTED (retriable): waiting for room instead would keep the
        large response in memory, which is what the budget bounds. Only reads
        answer large (Fetch), so a refused answer loses nothing: the messages
        stay until acknowledged and the client retries.
        """
        status = StatusCode(response.status)
        if isinstance(response, _OkReply):
            head, payload = response.prefix(), response.payload
        else:
            head, payload = b"", response.SerializeToString()
        try:
            header = encode_frame_header(
                len(head) + len(payload), max_frame_size=self.config.max_frame_size
            )
            # Large: write header and payload apart (joining copies the payload).
            if len(payload) > RECEIVE_CHUNK:
                frame = [header + head, payload]
            else:
                frame = [header + head + payload]
        except LocalProtocolError as exc:
            status = exc.code
            frame = _error_frame(exc.code, "response exceeds the frame cap", response.call_id)
        del payload
        reserved = sum(map(len, frame))
        pre = answer.take() if answer is not None else 0
        if reserved <= pre:
            self._sends.release(source, pre - reserved)
            fits = True
        else:
            fits = self._sends.try_reserve(source, reserved - pre)
            if not fits:
                self._sends.release(source, pre)
        if not fits:
            self._stats.send_budget_refusals += 1
            status = StatusCode.RESOURCE_EXHAUSTED
            frame = _error_frame(
                status,
                f"node is holding too many response bytes; retry later "
                f"(response of {reserved} bytes)",
                response.call_id,
            )
            # Under the floor this always fits; with floor 0 it may not (then it
            # goes out unbudgeted: a refusal must still reach the caller).
            reserved = len(frame[0]) if self._sends.try_reserve(source, len(frame[0])) else 0
        self._stats.statuses[status.name] += 1
        return frame, reserved

    async def _send(
        self,
        stream: trio.abc.HalfCloseableStream,
        source: str,
        frame: list[bytes],
        reserved: int,
        *,
        request_read: bool = False,
    ) -> None:
        """Send ``frame``, half-close, close -- within ``send_timeout``; then release
        its ``reserved`` budget bytes.

        The peer's flow control paces the send: a peer that does not take the
        response in time (it grants no credit) gets its stream reset, so neither
        the bytes nor the call slot stay pinned. A peer that left just gets a
        forceful close.
        """
        # After a request read whole, QUIC streams end the response with the FIN
        # in its last frame and no STOP_SENDING (the caller ends its side with a
        # FIN): two frames per call fewer than send_eof() + aclose(). A refusal
        # before or while reading keeps the STOP_SENDING: it is what stops the
        # caller sending the rest of a request nobody will read.
        send_final = getattr(stream, "send_final", None) if request_read else None
        try_final = getattr(stream, "try_send_final", None) if request_read else None
        try:
            # A response that fits the stream's send room goes out at once: no
            # send timer is needed when nothing will wait for the peer.
            if callable(try_final) and len(frame) == 1 and try_final(frame[0]):
                return
            with trio.move_on_after(self.config.send_timeout) as send_scope:
                if callable(send_final):
                    for part in frame[:-1]:
                        await stream.send_all(part)
                    await send_final(frame[-1])
                    return
                for part in frame:
                    await stream.send_all(part)
                await stream.send_eof()
        except _STREAM_GONE:
            self._stats.peer_resets += 1
            await self._abort(stream)
            return
        finally:
            self._sends.release(source, reserved)
        if send_scope.cancelled_caught:
            self._stats.send_timeouts += 1
            await self._abort(stream, StatusCode.DEADLINE_EXCEEDED)
            return
        await _close(stream)

    async def _abort(
        self, stream: trio.abc.HalfCloseableStream, code: StatusCode = StatusCode.CANCELLED
    ) -> None:
        reset = getattr(stream, "reset", None)
        if callable(reset):
            with contextlib.suppress(*_STREAM_GONE):
                reset(int(code))
        await trio.aclose_forcefully(stream)


class _OkReply:
    """A handler's answer: its serialized body, framed without another copy.

    ``Response(version, call_id, body)`` serializes as its small fields followed
    by field 3 (body) -- the highest-numbered field an OK response sets -- so the
    frame is ``header + prefix`` and then the payload object itself, byte for
    byte what ``Response.SerializeToString()`` gives (tests/unit check that).
    """

    __slots__ = ("call_id", "payload")

    status = StatusCode.OK

    def __init__(self, call_id: int, payload: bytes) -> None:
        self.call_id = call_id
        self.payload = payload

    def prefix(self) -> bytes:
        head = rpc_pb2.Response(version=WIRE_VERSION, call_id=self.call_id).SerializeToString()
        if not self.payload:
            return head  # proto3 leaves an empty bytes field out
        return head + b"\x1a" + encode_varint(len(self.payload))  # field 3, length-delimited


_Reply = rpc_pb2.Response | _OkReply


class _Answer:
    """One call's send-budget reservation made by its handler (``ctx.answer``).

    A grant may be smaller than asked: what the budget has room for, and never
    less than its floor (small answers always fit, as in ``rpc.budget``), so a
    handler under pressure answers fewer items instead of none.
    """

    __slots__ = ("_budget", "_floor", "_source", "frame_cap", "held")

    def __init__(
        self, budget: ByteBudget, source: str, floor: int, frame_cap: int = DEFAULT_MAX_FRAME_SIZE
    ) -> None:
        self._budget = budget
        self._source = source
        self._floor = floor
        self.frame_cap = frame_cap
        self.held = 0

    def reserve(self, nbytes: int) -> int:
        extra = nbytes - self.held
        if extra <= 0:
            return self.held
        b = self._budget
        if not b.fits(self._source, extra):
            room = min(b.limit - b.used, b.per_source - b.held_by(self._source))
            extra = max(room, min(extra, self._floor - self.held))
        if extra > 0 and b.try_reserve(self._source, extra):
            self.held += extra
        return self.held

    def shrink(self, nbytes: int) -> None:
        give = self.held - max(nbytes, 0)
        if give > 0:
            self._budget.release(self._source, give)
            self.held -= give

    def take(self) -> int:
        """Hand the reservation over (to the frame): it is no longer ours to release."""
        held, self.held = self.held, 0
        return held


class _Held:
    """One call's reservation in a budget (request bytes): reserve once, release once.

    ``whole``: the request frame was read completely (set by the reader).
    """

    __slots__ = ("_budget", "_source", "nbytes", "whole")

    def __init__(self, budget: ByteBudget, source: str) -> None:
        self._budget = budget
        self._source = source
        self.nbytes = 0
        self.whole = False

    def reserve(self, nbytes: int) -> bool:
        if self._budget.try_reserve(self._source, nbytes):
            self.nbytes = nbytes
            return True
        return False

    def release(self) -> None:
        self._budget.release(self._source, self.nbytes)
        self.nbytes = 0


def _error_frame(code: StatusCode, message: str, call_id: int) -> list[bytes]:
    return [encode_frame(error_response(code, message, call_id=call_id).SerializeToString())]


async def _close(stream: trio.abc.HalfCloseableStream) -> None:
    with contextlib.suppress(*_STREAM_GONE):
        await stream.aclose()


async def _watch_peer(
    stream: trio.abc.HalfCloseableStream, state: _CallState, scope: trio.CancelScope
) -> None:
    """While the handler runs, notice the caller giving up (reset) or misbehaving.

    The caller keeps its side open (or half-closes) after the request, so the
    only legal things left to read are end-of-stream and a reset. A reset
    cancels the handler: a long-poll must not hold a call slot for a caller
    that is gone. (Streams with ``watch_receive`` get the same verdict from
    :func:`_peer_verdict` without this task.)
    """
    await _peer_verdict(stream, state)
    if state.peer_gone or state.violation is not None:
        scope.cancel()


async def _peer_verdict(stream: trio.abc.HalfCloseableStream, state: _CallState) -> None:
    """Read what the caller sent after its request: end-of-stream is fine."""
    try:
        data = await stream.receive_some(RECEIVE_CHUNK)
    except _STREAM_GONE:
        state.peer_gone = True
        return
    if data:
        state.violation = RemoteProtocolError(
            "data after the request frame", code=StatusCode.INVALID_ARGUMENT
        )

"""Client side of a call: a stub over any ``open_stream`` (e.g. a QUIC connection's).

One attempt = one fresh bidirectional stream: write the Request, read one
Response, close. The send side stays open while the node works: a reset on
it is how the node learns the caller gave up (after a FIN, QUIC cannot
reliably deliver a reset, so a half-close would hide a cancellation). The caller's timeout is a *total* budget: retries and
backoff sleeps come out of it, and what is left travels to the node as the
request's ``deadline_ms``. A call abandoned for any reason (deadline, outer
cancellation, a broken peer) resets its stream so the node stops working on it.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TypeVar

import msgspec
import trio
from google.protobuf.message import DecodeError, Message

from qpc_node.errors import LocalProtocolError, QpcError, RemoteProtocolError, StatusCode
from qpc_node.rpc.errors import RpcError
from qpc_node.rpc.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, encode_frame
from qpc_node.rpc.protocol import (
    WIRE_VERSION,
    check_version,
    status_from_wire,
    valid_correlation_id,
)
from qpc_node.wire.gen.qpc.v1 import rpc_pb2

RespT = TypeVar("RespT", bound=Message)
OpenStream = Callable[[], Awaitable[trio.abc.HalfCloseableStream]]

RECEIVE_CHUNK = 64 * 1024
_STREAM_GONE = (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError)


class RetryPolicy(msgspec.Struct, frozen=True):
    """Exponential backoff with full jitter, for retriable status codes only.

    Full jitter (sleep uniformly in [0, cap]) spreads a crowd of clients that
    failed together, so they do not come back together.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff < 0 or self.multiplier < 1:
            raise LocalProtocolError(f"invalid retry policy: {self}")

    def backoff(self, retry: int, rand: float) -> float:
        """Sleep before retry number ``retry`` (0-based); ``rand`` is uniform in [0, 1)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**retry)
        return rand * cap


NO_RETRY = RetryPolicy(max_attempts=1)


class _ClientCounters(msgspec.Struct):
    """The live counters; ``statistics()`` hands out a frozen copy."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    aborted_streams: int = 0
    backoff_seconds: float = 0.0
    failures: Counter[str] = msgspec.field(default_factory=Counter)


class ClientStatistics(msgspec.Struct, frozen=True):
    """A snapshot of one client's calls; ``failures`` counts final errors by status name."""

    calls: int
    attempts: int
    retries: int
    aborted_streams: int
    backoff_seconds: float
    failures: Mapping[str, int]


class _StreamGone(Exception):
    """The stream broke under us (reset, closed connection)."""


class RpcClient:
    """Unary calls over streams from ``open_stream``; thread-unsafe, Trio-task-safe."""

    def __init__(
        self,
        open_stream: OpenStream,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        default_timeout: float = 30.0,
        retry_policy: RetryPolicy | None = None,
        random_source: Callable[[], float] = random.random,
        version: int = WIRE_VERSION,
    ) -> None:
        self._open_stream = open_stream
        self._max_frame_size = max_frame_size
        self._default_timeout = default_timeout
        self._policy = retry_policy or RetryPolicy()
        self._random = random_source
        self._version = version
        self._next_call_id = 1
        self._stats = _ClientCounters()

    def statistics(self) -> ClientStatistics:
        s = self._stats
        return ClientStatistics(
            calls=s.calls,
            attempts=s.attempts,
            retries=s.retries,
            aborted_streams=s.aborted_streams,
            backoff_seconds=s.backoff_seconds,
            failures=MappingProxyType(dict(s.failures)),
        )

    async def call(
        self,
        method: str,
        request: Message,
        response_type: type[RespT],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- a total budget incl. retries
        retries: int | None = None,
        retry_policy: RetryPolicy | None = None,
        correlation_id: str = "",
    ) -> RespT:
        """Call ``method``; return its decoded response or raise RpcError.

        ``timeout`` bounds the whole call including retries; ``retries``
        overrides the policy's attempt count (``retries=0``: one attempt).
        """
        if correlation_id and not valid_correlation_id(correlation_id):
            raise LocalProtocolError(f"malformed correlation_id {correlation_id!r}")
        policy = retry_policy or self._policy
        max_attempts = policy.max_attempts if retries is None else retries + 1
        budget = self._default_timeout if timeout is None else timeout
        deadline = trio.current_time() + budget
        body = request.SerializeToString()
        self._stats.calls += 1
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(method, body, response_type, deadline, correlation_id)
            except RpcError as err:
                err.attempts = attempt
                self._stats.failures[err.code.name] += 1
                if not err.code.retriable or attempt >= max_attempts:
                    raise
                delay = policy.backoff(attempt - 1, self._random())
                if trio.current_time() + delay >= deadline:
                    raise
                self._stats.retries += 1
                self._stats.backoff_seconds += delay
                await trio.sleep(delay)

    async def _attempt(
        self,
        method: str,
        body: bytes,
        response_type: type[RespT],
        deadline: float,
        correlation_id: str,
    ) -> RespT:
        self._stats.attempts += 1
        call_id = self._next_call_id
        self._next_call_id += 1
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", call_id=call_id)
        request = rpc_pb2.Request(
            version=self._version,
            method=method,
            call_id=call_id,
            body=body,
            # Round up: a 0 would mean "no deadline"; never promise the node more than we wait.
            deadline_ms=max(1, min(int(remaining * 1000), 2**32 - 1)),
            correlation_id=correlation_id,
        )
        try:
            frame = encode_frame(request.SerializeToString(), max_frame_size=self._max_frame_size)
        except LocalProtocolError as exc:
            raise RpcError(exc.code, exc.message, call_id=call_id) from exc
        raw: bytes | None = None
        with trio.move_on_at(deadline):
            raw = await self._exchange(frame, call_id)
        if raw is None:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", call_id=call_id)
        return self._decode(raw, call_id, response_type)

    async def _exchange(self, frame: bytes, call_id: int) -> bytes:
        try:
            stream = await self._open_stream()
        except (*_STREAM_GONE, QpcError) as exc:
            raise RpcError(
                StatusCode.UNAVAILABLE, f"cannot open a stream: {exc}", call_id=call_id
            ) from exc
        done = False
        try:
            # A node may refuse without reading the request: its answer tells why.
            with contextlib.suppress(*_STREAM_GONE):
                await stream.send_all(frame)
            try:
                raw = await self._read_frame(stream)
            except _StreamGone as exc:
                raise RpcError(
                    StatusCode.UNAVAILABLE, "stream closed before a response", call_id=call_id
                ) from exc
            except RemoteProtocolError as exc:  # the decoder's verdict on the node's bytes
                raise RpcError(exc.code, f"bad response: {exc.message}", call_id=call_id) from exc
            done = True
        finally:
            if not done:
                self._stats.aborted_streams += 1
                await _abort(stream)
        with contextlib.suppress(*_STREAM_GONE):
            await stream.aclose()
        return raw

    async def _read_frame(self, stream: trio.abc.HalfCloseableStream) -> bytes:
        decoder = FrameDecoder(self._max_frame_size)
        while True:
            try:
                data = await stream.receive_some(RECEIVE_CHUNK)
            except _STREAM_GONE as exc:
                raise _StreamGone() from exc
            if not data:
                decoder.close()
                raise _StreamGone()
            frames = decoder.feed(data)
            if frames:
                return frames[0]

    def _decode(self, raw: bytes, call_id: int, response_type: type[RespT]) -> RespT:
        response = rpc_pb2.Response()
        try:
            response.ParseFromString(raw)
            check_version(response.version)
        except DecodeError as exc:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT, "response frame is not a Response", call_id=call_id
            ) from exc
        except RemoteProtocolError as exc:
            raise RpcError(exc.code, exc.message, call_id=call_id) from exc
        status = status_from_wire(response.status)
        # 0 is how a node answers a stream it refused before reading the Request.
        if response.call_id != call_id and not (response.call_id == 0 and status != StatusCode.OK):
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"response for call {response.call_id}, expected {call_id}",
                call_id=call_id,
            )
        if status != StatusCode.OK:
            raise RpcError(status, response.message, call_id=call_id)
        result = response_type()
        try:
            result.ParseFromString(response.body)
        except DecodeError as exc:
            raise RpcError(
                StatusCode.INVALID_ARGUMENT,
                f"response body is not a {response_type.DESCRIPTOR.full_name}",
                call_id=call_id,
            ) from exc
        return result


async def _abort(stream: trio.abc.HalfCloseableStream) -> None:
    """Reset (QUIC streams can) so the node cancels the handler, then close."""
    reset = getattr(stream, "reset", None)
    if callable(reset):
        with contextlib.suppress(*_STREAM_GONE):
            reset(int(StatusCode.CANCELLED))
    await trio.aclose_forcefully(stream)

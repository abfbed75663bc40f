"""RpcClient against scripted peers: retry only on retriable codes with full-jitter
backoff inside the total budget; deadlines and cancellation reset the stream;
a misbehaving node gets a typed error, not a crash. Virtual clock throughout."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue

from qpc_node.errors import StatusCode
from qpc_node.rpc import RetryPolicy, RpcClient, RpcError
from qpc_node.rpc.framing import FrameDecoder, encode_frame, encode_varint
from qpc_node.rpc.inmemory import MemoryStream, MemoryStreamReset, memory_stream_pair
from qpc_node.wire.gen.qpc.v1 import rpc_pb2

Script = Callable[[MemoryStream, int], Awaitable[None]]
POLICY = RetryPolicy(max_attempts=4, initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)


class ScriptedPeer:
    """open_stream for the client; attempt n is answered by ``script(stream, n)``."""

    def __init__(self, nursery: trio.Nursery, script: Script) -> None:
        self._nursery = nursery
        self._script = script
        self.attempts = 0
        self.opened_at: list[float] = []
        self.resets: list[int] = []

    async def open_stream(self) -> MemoryStream:
        self.attempts += 1
        self.opened_at.append(trio.current_time())
        client_end, peer_end = memory_stream_pair()
        self._nursery.start_soon(self._run, peer_end, self.attempts)
        return client_end

    async def _run(self, stream: MemoryStream, attempt: int) -> None:
        try:
            await self._script(stream, attempt)
        except MemoryStreamReset as exc:
            self.resets.append(exc.error_code)


async def read_request(stream: MemoryStream) -> rpc_pb2.Request:
    decoder = FrameDecoder()
    while True:
        frames = decoder.feed(await stream.receive_some())
        if frames:
            return rpc_pb2.Request.FromString(frames[0])


def answer(status: StatusCode, *, body: bytes = b"", call_id: int | None = None) -> Script:
    async def script(stream: MemoryStream, attempt: int) -> None:
        req = await read_request(stream)
        resp = rpc_pb2.Response(
            version=1,
            call_id=req.call_id if call_id is None else call_id,
            status=int(status),  # type: ignore[arg-type]
            body=body,
            message=f"attempt {attempt}",
        )
        await stream.send_all(encode_frame(resp.SerializeToString()))
        await stream.send_eof()

    return script


def fail_then_ok(failures: int, code: StatusCode) -> Script:
    ok = answer(StatusCode.OK, body=BytesValue(value=b"done").SerializeToString())
    bad = answer(code)

    async def script(stream: MemoryStream, attempt: int) -> None:
        await (bad if attempt <= failures else ok)(stream, attempt)

    return script


async def test_retries_retriable_code_with_full_jitter_backoff(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    peer = ScriptedPeer(nursery, fail_then_ok(2, StatusCode.UNAVAILABLE))
    client = RpcClient(peer.open_stream, retry_policy=POLICY, random_source=lambda: 0.5)
    reply = await client.call("m", BytesValue(), BytesValue, timeout=10)
    assert reply.value == b"done"
    assert peer.attempts == 3
    gaps = [b - a for a, b in zip(peer.opened_at, peer.opened_at[1:], strict=False)]
    # rand * min(max, initial * 2**retry): 0.5*0.1, then 0.5*0.2
    assert gaps == pytest.approx([0.05, 0.1])
    stats = client.statistics()
    assert (stats.retries, stats.attempts, stats.failures["UNAVAILABLE"]) == (2, 3, 2)


@pytest.mark.parametrize(
    "code",
    [
        StatusCode.INVALID_ARGUMENT,
        StatusCode.UNAUTHENTICATED,
        StatusCode.INTERNAL,
        StatusCode.UNIMPLEMENTED,
        StatusCode.PAYLOAD_TOO_LARGE,
        StatusCode.UNSUPPORTED_VERSION,
    ],
)
async def test_non_retriable_codes_are_not_retried(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, code: StatusCode
) -> None:
    peer = ScriptedPeer(nursery, fail_then_ok(1, code))
    client = RpcClient(peer.open_stream, retry_policy=POLICY)
    with pytest.raises(RpcError) as info:
        await client.call("m", BytesValue(), BytesValue)
    assert info.value.code is code
    assert info.value.message == "attempt 1"
    assert (peer.attempts, info.value.attempts) == (1, 1)


async def test_attempts_are_bounded(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    peer = ScriptedPeer(nursery, answer(StatusCode.RESOURCE_EXHAUSTED))
    client = RpcClient(peer.open_stream, retry_policy=POLICY, random_source=lambda: 0.999)
    with pytest.raises(RpcError) as info:
        await client.call("m", BytesValue(), BytesValue, timeout=60)
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED
    assert peer.attempts == info.value.attempts == 4
    with pytest.raises(RpcError):
        await client.call("m", BytesValue(), BytesValue, retries=1)
    assert peer.attempts == 6


async def test_backoff_never_outlives_the_total_budget(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    peer = ScriptedPeer(nursery, answer(StatusCode.UNAVAILABLE))
    policy = RetryPolicy(max_attempts=100, initial_backoff=1.0, max_backoff=30.0)
    client = RpcClient(peer.open_stream, retry_policy=policy, random_source=lambda: 0.99)
    start = trio.current_time()
    with pytest.raises(RpcError) as info:
        await client.call("m", BytesValue(), BytesValue, timeout=5)
    assert info.value.code is StatusCode.UNAVAILABLE
    assert trio.current_time() - start < 5
    assert 1 < peer.attempts < 100


async def test_deadline_resets_stream_of_a_silent_node(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    seen: list[rpc_pb2.Request] = []

    async def silent(stream: MemoryStream, attempt: int) -> None:
        seen.append(await read_request(stream))
        await stream.receive_some()  # raises MemoryStreamReset when the client gives up

    peer = ScriptedPeer(nursery, silent)
    client = RpcClient(peer.open_stream, retry_policy=POLICY)
    start = trio.current_time()
    with pytest.raises(RpcError) as info:
        await client.call("m", BytesValue(), BytesValue, timeout=2)
    assert info.value.code is StatusCode.DEADLINE_EXCEEDED
    assert trio.current_time() - start == pytest.approx(2)
    await trio.testing.wait_all_tasks_blocked()
    assert peer.resets == [int(StatusCode.CANCELLED)]
    assert seen[0].deadline_ms == 2000  # the budget travels with the request
    assert client.statistics().aborted_streams == 1


async def test_outer_cancellation_resets_stream(nursery: trio.Nursery) -> None:
    async def silent(stream: MemoryStream, attempt: int) -> None:
        await read_request(stream)
        await stream.receive_some()

    peer = ScriptedPeer(nursery, silent)
    client = RpcClient(peer.open_stream)
    with trio.move_on_after(0.05) as scope:
        await client.call("m", BytesValue(), BytesValue)
    assert scope.cancelled_caught
    await trio.testing.wait_all_tasks_blocked()
    assert peer.resets == [int(StatusCode.CANCELLED)]


async def test_open_stream_failure_is_unavailable_and_retried(
    autojump_clock: trio.abc.Clock,
) -> None:
    calls = 0

    async def broken() -> MemoryStream:
        nonlocal calls
        calls += 1
        raise trio.ClosedResourceError("connection closed")

    client = RpcClient(broken, retry_policy=POLICY)
    with pytest.raises(RpcError) as info:
        await client.call("m", BytesValue(), BytesValue)
    assert info.value.code is StatusCode.UNAVAILABLE
    assert calls == POLICY.max_attempts


async def test_oversize_request_refused_locally() -> None:
    opened = 0

    async def never() -> MemoryStream:
        nonlocal opened
        opened += 1
        raise AssertionError("must not open a stream")

    client = RpcClient(never, max_frame_size=100)
    with pytest.raises(RpcError) as info:
        await client.call("m", BytesValue(value=b"x" * 200), BytesValue)
    assert info.value.code is StatusCode.PAYLOAD_TOO_LARGE
    assert opened == 0


def raw_reply(data: bytes) -> Script:
    async def script(stream: MemoryStream, attempt: int) -> None:
        await read_request(stream)
        await stream.send_all(data)
        await stream.send_eof()

    return script


@pytest.mark.parametrize(
    ("script", "code"),
    [
        (raw_reply(encode_frame(b"\xff\xff\xff")), StatusCode.INVALID_ARGUMENT),
        (raw_reply(encode_varint(10_000_000)), StatusCode.PAYLOAD_TOO_LARGE),
        (raw_reply(encode_varint(50) + b"short"), StatusCode.INVALID_ARGUMENT),
        (raw_reply(b""), StatusCode.UNAVAILABLE),
        (
            raw_reply(encode_frame(rpc_pb2.Response(version=9).SerializeToString())),
            StatusCode.UNSUPPORTED_VERSION,
        ),
        (answer(StatusCode.OK, call_id=999), StatusCode.INVALID_ARGUMENT),
        (answer(StatusCode.OK, body=b"\xff\xff"), StatusCode.INVALID_ARGUMENT),
        (answer(StatusCode.RESOURCE_EXHAUSTED, call_id=0), StatusCode.RESOURCE_EXHAUSTED),
    ],
    ids=[
        "garbage",
        "oversize",
        "truncated",
        "closed",
        "bad-version",
        "wrong-call-id",
        "bad-body",
        "refusal-call-id-0",
    ],
)
async def test_misbehaving_node_gets_typed_error(
    nursery: trio.Nursery, script: Script, code: StatusCode
) -> None:
    peer = ScriptedPeer(nursery, script)
    client = RpcClient(peer.open_stream, retry_policy=RetryPolicy(max_attempts=1))
    with pytest.raises(RpcError) as info:
        await client.call("m", BytesValue(), BytesValue)
    assert info.value.code is code


def test_backoff_is_full_jitter_under_a_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    assert policy.backoff(0, 0.0) == 0.0
    assert policy.backoff(3, 0.5) == pytest.approx(0.4)
    assert policy.backoff(30, 0.999) <= 1.0

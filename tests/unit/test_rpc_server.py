"""RpcServer over in-memory streams: every bad input gets its typed error, the
server keeps serving, and its buffers stay bounded."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from qpc_node.errors import QpcError, StatusCode
from qpc_node.rpc import (
    HEALTH_METHOD,
    CallContext,
    HealthService,
    MethodTable,
    PeerInfo,
    RpcClient,
    RpcError,
    RpcServer,
    ServerConfig,
)
from qpc_node.rpc.framing import FrameDecoder, encode_frame, encode_varint
from qpc_node.rpc.inmemory import MemoryConnection
from qpc_node.wire.gen.qpc.v1 import health_pb2, rpc_pb2

CAP = 4096
LIMIT = 4


class Probe:
    """Handlers under test; records what they saw."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.started = 0
        self.cancelled = 0
        self.contexts: list[CallContext] = []

    async def echo(self, req: BytesValue, ctx: CallContext) -> BytesValue:
        self.contexts.append(ctx)
        return BytesValue(value=req.value)

    async def hold(self, req: BytesValue, ctx: CallContext) -> BytesValue:
        self.started += 1
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        return BytesValue(value=b"released")

    async def slow(self, req: BytesValue, ctx: CallContext) -> BytesValue:
        await trio.sleep(3600)
        return BytesValue()

    async def denied(self, req: BytesValue, ctx: CallContext) -> BytesValue:
        raise QpcError("who are you", code=StatusCode.UNAUTHENTICATED)

    async def boom(self, req: BytesValue, ctx: CallContext) -> BytesValue:
        raise ValueError("secret path /etc/qpc/node.key")

    async def wrong_type(self, req: BytesValue, ctx: CallContext) -> BytesValue:
        return StringValue(value="oops")  # type: ignore[return-value]

    async def login(self, req: BytesValue, ctx: CallContext) -> BytesValue:
        previous = ctx.session.user or b""
        ctx.session.user = req.value
        return BytesValue(value=previous)


@pytest.fixture
async def setup(
    nursery: trio.Nursery,
) -> AsyncIterator[tuple[RpcServer, MemoryConnection, RpcClient, Probe]]:
    probe = Probe()
    methods = MethodTable()
    HealthService().register(methods)
    for name in ("echo", "hold", "denied", "boom", "wrong_type", "login"):
        methods.register(f"t.{name}", BytesValue, BytesValue, getattr(probe, name))
    methods.register("t.slow", BytesValue, BytesValue, probe.slow, max_timeout=2.0)
    server = RpcServer(
        methods, ServerConfig(max_frame_size=CAP, max_concurrent_calls=LIMIT, read_timeout=5.0)
    )
    conn = MemoryConnection(server, nursery, PeerInfo("conn-1", ("::1", 4201), identity="fp:ab"))
    client = RpcClient(conn.open_stream, max_frame_size=CAP, retry_policy=None)
    yield server, conn, client, probe
    probe.release.set()


async def raw_exchange(
    conn: MemoryConnection, data: bytes, *, eof: bool = True
) -> rpc_pb2.Response:
    """Write bytes a well-behaved client never would; read the one Response."""
    stream = await conn.open_raw_stream()
    await stream.send_all(data)
    if eof:
        await stream.send_eof()
    decoder = FrameDecoder(CAP)
    frames: list[bytes] = []
    while not frames:
        chunk = await stream.receive_some(65536)
        assert chunk, "server closed without a Response"
        frames = decoder.feed(chunk)
    response = rpc_pb2.Response()
    response.ParseFromString(frames[0])
    return response


def request_frame(method: str = "t.echo", body: bytes = b"", **fields: object) -> bytes:
    values: dict[str, object] = {"version": 1, "method": method, "call_id": 7, "body": body}
    values.update(fields)
    req = rpc_pb2.Request(**values)  # type: ignore[arg-type]
    return encode_frame(req.SerializeToString())


async def assert_still_serving(client: RpcClient) -> None:
    reply = await client.call("t.echo", BytesValue(value=b"ping"), BytesValue, retries=0)
    assert reply.value == b"ping"


async def test_health_end_to_end(
    setup: tuple[RpcServer, MemoryConnection, RpcClient, Probe], autojump_clock: trio.abc.Clock
) -> None:
    _, _, client, _ = setup
    await trio.sleep(5)
    reply = await client.call(HEALTH_METHOD, health_pb2.HealthRequest(), health_pb2.HealthResponse)
    assert reply.status == health_pb2.HealthResponse.SERVING
    assert reply.node_version
    assert reply.uptime_ms >= 5000


async def test_context_carries_peer_call_and_session(
    setup: tuple[RpcServer, MemoryConnection, RpcClient, Probe],
) -> None:
    _, _, client, probe = setup
    await client.call("t.echo", BytesValue(value=b"a"), BytesValue, correlation_id="trace-1")
    await client.call("t.echo", BytesValue(value=b"b"), BytesValue)
    first, second = probe.contexts
    assert first.peer_identity == "fp:ab"
    assert first.remote_address == ("::1", 4201)
    assert first.correlation_id == "trace-1"
    assert second.correlation_id == f"conn-1/{second.call_id}"
    assert first.call_id != second.call_id
    assert first.time_remaining() > 0
    # The session outlives a call: a later auth layer fills it once per connection.
    assert (await client.call("t.login", BytesValue(value=b"alice"), BytesValue)).value == b""
    assert (await client.call("t.login", BytesValue(value=b"bob"), BytesValue)).value == b"alice"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (encode_varint(CAP + 1) + b"x" * 64, StatusCode.PAYLOAD_TOO_LARGE),
        (encode_varint(100) + b"x" * 10, StatusCode.INVALID_ARGUMENT),  # truncated
        (b"", StatusCode.INVALID_ARGUMENT),  # no request at all
        (b"\x80\x00", StatusCode.INVALID_ARGUMENT),  # malformed length
        (encode_frame(b"\xff\xff\xff\xff"), StatusCode.INVALID_ARGUMENT),  # garbage protobuf
        (encode_frame(b"\x12\x02\xc3\x28"), StatusCode.INVALID_ARGUMENT),  # method not UTF-8
        (request_frame() + request_frame(), StatusCode.INVALID_ARGUMENT),  # two requests
        (request_frame(body=b"\xff\xff"), StatusCode.INVALID_ARGUMENT),  # body not BytesValue
        (request_frame(version=2), StatusCode.UNSUPPORTED_VERSION),
        (request_frame(version=0), StatusCode.UNSUPPORTED_VERSION),
        (request_frame(method="t.nope"), StatusCode.UNIMPLEMENTED),
        (request_frame(correlation_id="a b\n"), StatusCode.INVALID_ARGUMENT),
    ],
    ids=[
        "oversize",
        "truncated",
        "empty",
        "bad-varint",
        "garbage",
        "bad-utf8",
        "two-frames",
        "bad-body",
        "version-2",
        "version-0",
        "unknown-method",
        "bad-correlation-id",
    ],
)
async def test_bad_input_gets_typed_error_and_server_keeps_serving(
    setup: tuple[RpcServer, MemoryConnection, RpcClient, Probe], data: bytes, code: StatusCode
) -> None:
    server, conn, client, _ = setup
    response = await raw_exchange(conn, data)
    assert StatusCode(response.status) is code
    assert response.message
    assert not response.body
    await assert_still_serving(client)
    await trio.testing.wait_all_tasks_blocked()
    stats = server.statistics()
    assert stats.buffered_bytes == 0
    assert stats.peak_buffered_bytes <= CAP + 8
    assert stats.active_calls == 0


async def test_data_after_request_is_refused(
    setup: tuple[RpcServer, MemoryConnection, RpcClient, Probe],
) -> None:
    _, conn, client, probe = setup
    stream = await conn.open_raw_stream()
    await stream.send_all(request_frame("t.hold"))
    await trio.testing.wait_all_tasks_blocked()
    assert probe.started == 1
    await stream.send_all(b"junk")
    decoder = FrameDecoder(CAP)
    response = rpc_pb2.Response.FromString(decoder.feed(await stream.receive_some())[0])
    assert StatusCode(response.status) is StatusCode.INVALID_ARGUMENT
    assert response.call_id == 7
    assert probe.cancelled == 1
    await assert_still_serving(client)


async def test_handler_errors_map_to_codes_without_leaking(
    setup: tuple[RpcServer, MemoryConnection, RpcClient, Probe],
) -> None:
    server, _, client, _ = setup
    with pytest.raises(RpcError) as denied:
        await client.call("t.denied", BytesValue(), BytesValue)
    assert denied.value.code is StatusCode.UNAUTHENTICATED
    assert denied.value.message == "who are you"
    for method in ("t.boom", "t.wrong_type"):
        with pytest.raises(RpcError) as internal:
            await client.call(method, BytesValue(), BytesValue)
        assert internal.value.code is StatusCode.INTERNAL
        assert "secret" not in internal.value.message
        assert "correlation id" in internal.value.message
    assert server.statistics().internal_errors == 2
    await assert_still_serving(client)


async def test_server_deadline_from_method_cap(
    setup: tuple[RpcServer, MemoryConnection, RpcClient, Probe], autojump_clock: trio.abc.Clock
) -> None:
    _, _, client, _ = setup
    start = trio.current_time()
    with pytest.raises(RpcError) as info:
        await client.call("t.slow", BytesValue(), BytesValue, timeout=30, retries=0)
    assert info.value.code is StatusCode.DEADLINE_EXCEEDED
    assert trio.current_time() - start == pytest.approx(2.0)  # the method's cap, not 30 s


async def test_slow_sender_times_out(
    setup: tuple[RpcServer, MemoryConnection, RpcClient, Probe], autojump_clock: trio.abc.Clock
) -> None:
    server, conn, client, _ = setup
    response = await raw_exchange(conn, encode_varint(100) + b"x", eof=False)
    assert StatusCode(response.status) is StatusCode.DEADLINE_EXCEEDED
    assert server.statistics().buffered_bytes == 0
    await assert_still_serving(client)


async def test_client_reset_mid_call_cancels_handler(
    setup: tuple[RpcServer, MemoryConnection, RpcClient, Probe],
) -> None:
    server, _, client, probe = setup
    with trio.move_on_after(1) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.call, "t.hold", BytesValue(), BytesValue)
            await trio.testing.wait_all_tasks_blocked()
            assert probe.started == 1
            scope.cancel()
    assert scope.cancelled_caught
    await trio.testing.wait_all_tasks_blocked()
    assert probe.cancelled == 1
    assert client.statistics().aborted_streams == 1
    stats = server.statistics()
    assert stats.peer_resets == 1
    assert stats.active_calls == 0
    await assert_still_serving(client)


async def test_calls_beyond_limit_refused_immediately(
    setup: tuple[RpcServer, MemoryConnection, RpcClient, Probe],
) -> None:
    server, conn, client, probe = setup
    results: list[bytes] = []
    refused: list[StatusCode] = []

    async def held_call() -> None:
        results.append((await client.call("t.hold", BytesValue(), BytesValue)).value)

    async def excess_call() -> None:
        try:
            await client.call("t.echo", BytesValue(value=b"x" * 1000), BytesValue, retries=0)
        except RpcError as exc:
            refused.append(exc.code)

    async with trio.open_nursery() as nursery:
        for _ in range(LIMIT):
            nursery.start_soon(held_call)
        await trio.testing.wait_all_tasks_blocked()
        assert probe.started == LIMIT
        async with trio.open_nursery() as excess:
            for _ in range(3 * LIMIT):
                excess.start_soon(excess_call)
        # Every excess call was answered while the held ones still run.
        assert refused == [StatusCode.RESOURCE_EXHAUSTED] * (3 * LIMIT)
        stats = server.statistics()
        assert stats.active_calls == LIMIT
        assert stats.peak_buffered_bytes <= LIMIT * (CAP + 8)
        probe.release.set()
    assert results == [b"released"] * LIMIT
    assert conn.state.statistics().peak_active_calls == LIMIT
    assert server.statistics().refused_calls == 3 * LIMIT
    await assert_still_serving(client)

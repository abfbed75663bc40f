"""RPC over real QUIC (loopback UDP, mutual TLS) and over the quic layer's fake
lossy network: identities reach handlers, bad input gets typed errors, the
node keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from qpc_node.errors import StatusCode
from qpc_node.quic import (
    ALPN_FEDERATION,
    ClientTLS,
    Connection,
    ServerTLS,
    open_endpoint,
)
from qpc_node.quic.testing import FakeNetwork, LinkProfile, PkiFixture, make_test_pki
from qpc_node.rpc import (
    HEALTH_METHOD,
    CallContext,
    HealthService,
    MethodTable,
    RetryPolicy,
    RpcClient,
    RpcError,
    RpcServer,
    ServerConfig,
)
from qpc_node.rpc.framing import FrameDecoder, encode_frame, encode_varint
from qpc_node.rpc.quic import QuicRpcHandler
from qpc_node.wire.gen.qpc.v1 import health_pb2, rpc_pb2

CAP = 64 * 1024
LIMIT = 8


@pytest.fixture(scope="module")
def pki() -> PkiFixture:
    return make_test_pki()


@dataclass
class Node:
    server: RpcServer
    handler: QuicRpcHandler
    conn: Connection
    client: RpcClient
    release: trio.Event
    held: list[int]


def make_server() -> tuple[RpcServer, trio.Event, list[int]]:
    release = trio.Event()
    held = [0, 0]  # started, cancelled

    async def whoami(req: BytesValue, ctx: CallContext) -> StringValue:
        ident = ctx.peer_identity
        return StringValue(value=f"{ident.cert_fingerprint}|{ctx.peer.alpn}")

    async def echo(req: BytesValue, ctx: CallContext) -> BytesValue:
        return BytesValue(value=req.value)

    async def hold(req: BytesValue, ctx: CallContext) -> BytesValue:
        held[0] += 1
        try:
            await release.wait()
        except trio.Cancelled:
            held[1] += 1
            raise
        return BytesValue(value=b"released")

    methods = MethodTable()
    HealthService().register(methods)
    methods.register("t.whoami", BytesValue, StringValue, whoami)
    methods.register("t.echo", BytesValue, BytesValue, echo)
    methods.register("t.hold", BytesValue, BytesValue, hold)
    config = ServerConfig(max_frame_size=CAP, max_concurrent_calls=LIMIT, read_timeout=5)
    return RpcServer(methods, config), release, held


@pytest.fixture
async def node(pki: PkiFixture) -> AsyncIterator[Node]:
    server, release, held = make_server()
    handler = QuicRpcHandler(server)
    tls = ServerTLS(pki.server, federation_ca=pki.ca.certificate_pem)
    with trio.fail_after(30):
        async with (
            open_endpoint("127.0.0.1", 0, server_tls=tls) as sep,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(sep.serve, handler)
            async with open_endpoint("127.0.0.1", 0) as cep:
                ctls = ClientTLS(ALPN_FEDERATION, ca=pki.ca.certificate_pem, credentials=pki.client)
                conn = await cep.connect(sep.local_address[0], sep.local_address[1], ctls)
                client = RpcClient(conn.open_stream, max_frame_size=CAP)
                yield Node(server, handler, conn, client, release, held)
                release.set()
            nursery.cancel_scope.cancel()


async def raw_exchange(conn: Connection, data: bytes) -> rpc_pb2.Response:
    stream = await conn.open_stream()
    await stream.send_all(data)
    await stream.send_eof()
    decoder = FrameDecoder(CAP)
    frames: list[bytes] = []
    while not frames:
        chunk = await stream.receive_some()
        assert chunk, "stream ended without a Response"
        frames = decoder.feed(chunk)
    await stream.aclose()
    return rpc_pb2.Response.FromString(frames[0])


def request_frame(method: str = "t.echo", version: int = 1, body: bytes = b"") -> bytes:
    req = rpc_pb2.Request(version=version, method=method, call_id=5, body=body)
    return encode_frame(req.SerializeToString())


async def test_health_and_mtls_identity_end_to_end(node: Node, pki: PkiFixture) -> None:
    health = await node.client.call(
        HEALTH_METHOD, health_pb2.HealthRequest(), health_pb2.HealthResponse
    )
    assert health.status == health_pb2.HealthResponse.SERVING
    who = await node.client.call("t.whoami", BytesValue(), StringValue)
    assert who.value == f"{pki.client.fingerprint}|{ALPN_FEDERATION}"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (encode_varint(CAP + 1) + b"x" * 100, StatusCode.PAYLOAD_TOO_LARGE),
        (encode_varint(500) + b"x" * 20, StatusCode.INVALID_ARGUMENT),
        (encode_frame(b"\xff\xfe\xfd"), StatusCode.INVALID_ARGUMENT),
        (request_frame(version=7), StatusCode.UNSUPPORTED_VERSION),
        (request_frame(method="t.missing"), StatusCode.UNIMPLEMENTED),
        (request_frame(body=b"\xff"), StatusCode.INVALID_ARGUMENT),
    ],
    ids=["oversize", "truncated", "garbage", "version", "unknown-method", "bad-body"],
)
async def test_bad_input_over_quic(node: Node, data: bytes, code: StatusCode) -> None:
    response = await raw_exchange(node.conn, data)
    assert StatusCode(response.status) is code
    reply = await node.client.call("t.echo", BytesValue(value=b"still"), BytesValue)
    assert reply.value == b"still"
    assert node.server.statistics().buffered_bytes == 0


async def test_reset_mid_call_cancels_handler_over_quic(node: Node) -> None:
    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.client.call, "t.hold", BytesValue(), BytesValue)
            with trio.fail_after(5):
                while node.held[0] < 1:  # noqa: ASYNC110 -- the network, not a task, delivers it
                    await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        while node.held[1] < 1:  # noqa: ASYNC110
            await trio.sleep(0.005)
    assert node.server.statistics().peer_resets >= 1
    assert (await node.client.call("t.echo", BytesValue(value=b"ok"), BytesValue)).value == b"ok"


async def test_data_after_request_cancels_handler_over_quic(node: Node) -> None:
    stream = await node.conn.open_stream()
    await stream.send_all(request_frame("t.hold"))
    with trio.fail_after(5):
        while node.held[0] < 1:  # noqa: ASYNC110 -- the network, not a task, delivers it
            await trio.sleep(0.005)
    await stream.send_all(b"junk")
    decoder = FrameDecoder(CAP)
    frames: list[bytes] = []
    with trio.fail_after(5):
        while not frames:
            chunk = await stream.receive_some()
            assert chunk, "stream ended without a Response"
            frames = decoder.feed(chunk)
    await stream.aclose()
    response = rpc_pb2.Response.FromString(frames[0])
    assert StatusCode(response.status) is StatusCode.INVALID_ARGUMENT
    assert response.call_id == 5
    assert node.held[1] == 1  # the handler was cancelled, not left running
    with trio.fail_after(5):
        while node.server.statistics().active_calls:  # noqa: ASYNC110 -- slot freed after the send
            await trio.sleep(0.005)
    assert (await node.client.call("t.echo", BytesValue(value=b"ok"), BytesValue)).value == b"ok"


async def test_calls_beyond_limit_refused_over_quic(node: Node) -> None:
    refused: list[StatusCode] = []
    results: list[bytes] = []

    async def held_call() -> None:
        results.append((await node.client.call("t.hold", BytesValue(), BytesValue)).value)

    async def excess() -> None:
        try:
            await node.client.call("t.echo", BytesValue(), BytesValue, retries=0)
        except RpcError as exc:
            refused.append(exc.code)

    async with trio.open_nursery() as nursery:
        for _ in range(LIMIT):
            nursery.start_soon(held_call)
        with trio.fail_after(5):
            while node.held[0] < LIMIT:  # noqa: ASYNC110
                await trio.sleep(0.005)
        async with trio.open_nursery() as burst:
            for _ in range(2 * LIMIT):
                burst.start_soon(excess)
        assert refused == [StatusCode.RESOURCE_EXHAUSTED] * (2 * LIMIT)
        node.release.set()
    assert results == [b"released"] * LIMIT
    assert node.server.statistics().peak_buffered_bytes <= LIMIT * (CAP + 8)


async def test_1000_calls_over_lossy_fake_network(pki: PkiFixture) -> None:
    # Real clock: under MockClock(autojump_threshold=0) the endpoint does not get
    # through the handshake (seen with the quic package at the time of writing).
    net = FakeNetwork(seed=7, profile=LinkProfile(drop=0.03, duplicate=0.01, reorder=0.05))
    server, _, _ = make_server()
    tls = ServerTLS(pki.server, federation_ca=pki.ca.certificate_pem)
    with trio.fail_after(60):
        async with (
            open_endpoint(server_tls=tls, sock=net.bind("10.0.0.1", 4201)) as sep,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(sep.serve, QuicRpcHandler(server))
            async with open_endpoint(sock=net.bind("10.0.0.2")) as cep:
                ctls = ClientTLS(ALPN_FEDERATION, ca=pki.ca.certificate_pem, credentials=pki.client)
                conn = await cep.connect("10.0.0.1", 4201, ctls)
                # As many callers as the node's per-connection limit; a slot freed a
                # moment after its answer arrived is what the retry is for.
                client = RpcClient(conn.open_stream, retry_policy=RetryPolicy(max_attempts=5))
                got: list[bytes] = []

                async def worker(w: int) -> None:
                    for i in range(125):
                        payload = b"%d-%d" % (w, i) * (1 + i % 40)
                        reply = await client.call(
                            "t.echo", BytesValue(value=payload), BytesValue, timeout=60
                        )
                        assert reply.value == payload
                        got.append(reply.value)

                async with trio.open_nursery() as workers:
                    for w in range(LIMIT):
                        workers.start_soon(worker, w)
            nursery.cancel_scope.cancel()
    assert len(got) == 1000
    assert net.stats.dropped > 0  # the network really was lossy
    stats = server.statistics()
    assert stats.statuses["OK"] == 1000
    assert stats.buffered_bytes == 0

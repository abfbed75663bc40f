"""The node's RPC surface, driven through the REAL services on a real store.

One environment ("node") composes what ``Node._build`` composes -- Health,
Auth, Directory, Delivery behind a Guard, audit into the store -- over an
AsyncStore in a tmp dir, served by an RpcServer on in-memory streams with
QUIC stream semantics. Differences from a production node, on purpose:
rate limits are huge (so mutants reach the handlers instead of the bucket)
and the long-poll cap is 5 ms (so a mutated ``wait_ms`` cannot stall a run).

Every answer must be exactly one frame holding a well-formed Response with a
known status; INTERNAL (a handler raised something untyped) is a crash; a
call id is echoed; OK bodies parse as the method's response type. After a
run the server holds no buffers and no active calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf.message import DecodeError, Message

from qpc_node import crypto
from qpc_node.errors import StatusCode
from qpc_node.mesh.routing import Router, sign_binding
from qpc_node.mesh.service import verify_node, verify_user
from qpc_node.ops.clock import system_wall_ms
from qpc_node.rpc import HealthService, MethodTable, PeerInfo, RpcServer, ServerConfig
from qpc_node.rpc.client import RetryPolicy, RpcClient
from qpc_node.rpc.errors import RpcError
from qpc_node.rpc.framing import FrameDecoder, encode_frame
from qpc_node.rpc.inmemory import MemoryConnection, MemoryStreamReset, memory_stream_pair
from qpc_node.rpc.protocol import WIRE_VERSION
from qpc_node.rpc.server import RECEIVE_CHUNK
from qpc_node.service.audit import AuditSink
from qpc_node.service.auth import auth_message
from qpc_node.service.auth_service import AuthService
from qpc_node.service.channels import ChannelService
from qpc_node.service.delivery import DeliveryService
from qpc_node.service.directory import DirectoryService
from qpc_node.service.guard import Guard
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.store import AsyncStore
from qpc_node.store.channels import ChannelLimits, ChannelStore
from qpc_node.wire.envelope import Envelope, pad
from qpc_node.wire.gen.qpc.v1 import channel_pb2, envelope_pb2, health_pb2, rpc_pb2, service_pb2
from tests.fuzz.h_wire import wire_fixtures
from tests.fuzz.registry import Invariant, environment, register

MAX_FRAME = 1024 * 1024
NODE_FPR = b"\x11" * 32
# The node is on a mesh: Prove's home binding goes to a real routing core.
MESH_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz-rpc-mesh").digest())
MESH_PUB = MESH_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
MESH_NODE = hashlib.sha256(MESH_PUB).digest()
LONG_POLL_CAP = 0.005
_S = service_pb2

# method -> (request type, response type)
METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "qpc.v1.Health/Check": (health_pb2.HealthRequest, health_pb2.HealthResponse),
    "qpc.v1.Auth/Challenge": (_S.AuthChallengeRequest, _S.AuthChallengeResponse),
    "qpc.v1.Auth/Prove": (_S.AuthProveRequest, _S.AuthProveResponse),
    "qpc.v1.Directory/Upload": (_S.UploadKeyPackagesRequest, _S.UploadKeyPackagesResponse),
    "qpc.v1.Directory/Fetch": (_S.FetchKeyPackageRequest, _S.FetchKeyPackageResponse),
    "qpc.v1.Directory/Count": (_S.CountKeyPackagesRequest, _S.CountKeyPackagesResponse),
    "qpc.v1.Delivery/Enqueue": (_S.EnqueueRequest, _S.EnqueueResponse),
    "qpc.v1.Delivery/Fetch": (_S.FetchRequest, _S.FetchResponse),
    "qpc.v1.Delivery/Ack": (_S.AckRequest, _S.AckResponse),
    "qpc.v1.Channel/Publish": (
        channel_pb2.ChannelPublishRequest,
        channel_pb2.ChannelPublishResponse,
    ),
    "qpc.v1.Channel/Fetch": (channel_pb2.ChannelFetchRequest, channel_pb2.ChannelFetchResponse),
}


@dataclass(slots=True)
class NodeEnv:
    server: RpcServer
    store: AsyncStore
    delivery: DeliveryService
    audit: AuditSink
    authed: MemoryConnection  # session proven as alice (homed here)
    anon: MemoryConnection  # no session
    prover: MemoryConnection  # gets a fresh challenge before every Auth/Prove input
    alice: crypto.Identity
    bob: crypto.Identity
    alice_fpr: bytes
    bob_fpr: bytes
    call_ids: itertools.count[int]


@environment("node")
@contextlib.asynccontextmanager
async def node_env(tmp: Path) -> AsyncIterator[NodeEnv]:
    # An INTERNAL answer is already a crash with its input; the server's own
    # traceback log would only flood the run's output.
    server_log = logging.getLogger("qpc_node.rpc.server")
    was_disabled, server_log.disabled = server_log.disabled, True
    store = await AsyncStore.open(tmp / "node.db", synchronous="NORMAL")
    try:
        async with trio.open_nursery() as nursery:
            audit = AuditSink(store)
            await nursery.start(audit.run)

            def limiter() -> TokenBucketLimiter[str]:
                return TokenBucketLimiter[str](rate=1e9, burst=1e9)

            guard = Guard(
                per_ip=limiter(), per_identity=limiter(), audit=audit, wall_ms=system_wall_ms
            )
            table = MethodTable()
            HealthService().register(table)
            delivery = DeliveryService(store, guard, wall_ms=system_wall_ms, max_wait=LONG_POLL_CAP)
            delivery.register(table)
            DirectoryService(store, guard, audit, wall_ms=system_wall_ms).register(table)
            ChannelService(
                ChannelStore(store, ChannelLimits(max_messages=500, max_bytes=1 << 20)),
                guard,
                wall_ms=system_wall_ms,
                limiter=limiter(),
                mail=delivery.waiters,
                max_wait=LONG_POLL_CAP,
            ).register(table)
            router = Router(
                MESH_PUB,
                MESH_KEY.sign,
                verify_node,
                verify_user=verify_user,
                rand=random.Random(1).random,
                now_ms=system_wall_ms(),
            )
            AuthService(
                guard,
                audit,
                node_cert_fingerprint=NODE_FPR,
                on_authenticated=delivery.mark_local,
                mesh_node_id=router.node_id,
                on_home=lambda b: router.home(b, system_wall_ms()),
            ).register(table)
            server = RpcServer(table, ServerConfig(max_frame_size=MAX_FRAME, read_timeout=5.0))
            alice = crypto.Identity.create(tmp / "alice", os.urandom(32), durable=False)
            bob = crypto.Identity.create(tmp / "bob", os.urandom(32), durable=False)
            a_fpr, b_fpr = bytes.fromhex(alice.fingerprint), bytes.fromhex(bob.fingerprint)

            def conn(name: str) -> MemoryConnection:
                return MemoryConnection(
                    server, nursery, PeerInfo(f"fuzz-{name}", remote_address=("10.0.0.1", 4201))
                )

            env = NodeEnv(
                server, store, delivery, audit, conn("authed"), conn("anon"), conn("prover"),
                alice, bob, a_fpr, b_fpr, itertools.count(1),
            )  # fmt: skip
            env.authed.state.session.user = a_fpr
            await delivery.mark_local(a_fpr)
            await delivery.mark_local(b_fpr)
            try:
                yield env
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
        server_log.disabled = was_disabled


async def exchange(conn: MemoryConnection, raw: bytes) -> bytes:
    """Write ``raw`` on a fresh stream, half-close, read everything the node answers."""
    stream = await conn.open_raw_stream()
    out = bytearray()
    try:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(raw)
            await stream.send_eof()
        while chunk := await stream.receive_some(RECEIVE_CHUNK):
            out += chunk
            if len(out) > MAX_FRAME + 16:
                raise Invariant(f"node answered more than one frame's worth ({len(out)} bytes)")
    except MemoryStreamReset as exc:
        raise Invariant(f"node reset a stream whose caller was still there: {exc}") from None
    finally:
        await stream.aclose()
    return bytes(out)


def check_response(
    raw: bytes, *, call_id: int | None = None, response_type: type[Message] | None = None
) -> rpc_pb2.Response:
    """Exactly one frame, a well-formed Response, a known non-INTERNAL status."""
    dec = FrameDecoder(MAX_FRAME)
    try:
        frames = dec.feed(raw)
        dec.close()
    except Exception as exc:
        raise Invariant(f"answer is not one clean frame: {exc!r}") from None
    if len(frames) != 1:
        raise Invariant(f"answer holds {len(frames)} frames")
    resp = rpc_pb2.Response()
    try:
        resp.ParseFromString(frames[0])
    except DecodeError:
        raise Invariant("answer frame is not a Response") from None
    if resp.version != WIRE_VERSION:
        raise Invariant(f"Response.version {resp.version}")
    try:
        status = StatusCode(resp.status)
    except ValueError:
        raise Invariant(f"unknown status {resp.status}") from None
    if status == StatusCode.INTERNAL:
        raise Invariant(f"INTERNAL (a handler raised an untyped error): {resp.message}")
    if call_id is not None and resp.call_id not in (call_id, 0):
        raise Invariant(f"call_id {resp.call_id} echoed for call {call_id}")
    if status == StatusCode.OK:
        if resp.message:
            raise Invariant("OK response with an error message")
        if response_type is not None:
            try:
                response_type.FromString(resp.body)
            except DecodeError:
                raise Invariant(f"OK body is not a {response_type.__name__}") from None
    elif resp.body or not resp.message:
        raise Invariant(f"{status.name} response with a body or without a message")
    return resp


def request_frame(method: str, body: bytes, call_id: int, deadline_ms: int = 5000) -> bytes:
    req = rpc_pb2.Request(
        version=WIRE_VERSION, method=method, call_id=call_id, body=body, deadline_ms=deadline_ms
    )
    return encode_frame(req.SerializeToString(), max_frame_size=MAX_FRAME)


# -- seed corpora (valid bodies, with boundary values) ---------------------------------


def _envelope(recipient: bytes, n: int, **kw: Any) -> envelope_pb2.Envelope:
    fields: dict[str, Any] = {
        "msg_id": n.to_bytes(16, "big"),
        "recipient": recipient,
        "expiry_ms": system_wall_ms() + 3_600_000,
        "hop_limit": 8,
        "ciphertext": pad(b"c" * (n * 37 % 700)),
    }
    fields.update(kw)
    return Envelope(**fields).to_proto()


def body_seeds(env: NodeEnv, method: str) -> list[bytes]:
    a, b = env.alice_fpr, env.bob_fpr
    msgs: list[Message]
    if method in ("qpc.v1.Health/Check", "qpc.v1.Auth/Challenge", "qpc.v1.Directory/Count"):
        msgs = [METHODS[method][0]()]
    elif method == "qpc.v1.Auth/Prove":
        sig = env.alice.sign(auth_message(b"\0" * 32, NODE_FPR))
        now = system_wall_ms()
        home = sign_binding(env.alice.public_key, env.alice.sign, MESH_NODE, now, now + 3_600_000)
        elsewhere = sign_binding(env.alice.public_key, env.alice.sign, b"\x07" * 32, 1, now + 1)
        msgs = [
            _S.AuthProveRequest(public_key=env.alice.public_key, signature=sig),
            _S.AuthProveRequest(
                public_key=env.alice.public_key, signature=sig, home=home.to_proto()
            ),
            _S.AuthProveRequest(
                public_key=env.alice.public_key, signature=sig, home=elsewhere.to_proto()
            ),
            _S.AuthProveRequest(public_key=env.bob.public_key, signature=sig),
            _S.AuthProveRequest(public_key=b"\0" * 32, signature=b"\0" * 64),
        ]
    elif method == "qpc.v1.Directory/Upload":
        kp = _S.KeyPackageUpload
        msgs = [
            _S.UploadKeyPackagesRequest(packages=[kp(key_package=env.alice.key_package())]),
            _S.UploadKeyPackagesRequest(
                packages=[
                    kp(key_package=env.alice.key_package()),
                    kp(key_package=env.alice.key_package(last_resort=True), last_resort=True),
                ]
            ),
            _S.UploadKeyPackagesRequest(packages=[kp(key_package=env.bob.key_package())]),
        ]
    elif method == "qpc.v1.Directory/Fetch":
        msgs = [_S.FetchKeyPackageRequest(identity=x) for x in (a, b, b"\0" * 32, a[:31])]
    elif method == "qpc.v1.Delivery/Enqueue":
        msgs = [
            _S.EnqueueRequest(envelopes=[_envelope(a, 1)]),
            _S.EnqueueRequest(envelopes=[_envelope(b, 2), _envelope(a, 3, hop_limit=16)]),
            _S.EnqueueRequest(envelopes=[_envelope(a, 4, expiry_ms=2**64 - 1, hop_limit=0)]),
            _S.EnqueueRequest(envelopes=[_envelope(b"\x42" * 32, 5)]),
            _S.EnqueueRequest(envelopes=[_envelope(a, 6), _envelope(b"\x42" * 32, 7)], atomic=True),
        ]
    elif method == "qpc.v1.Delivery/Fetch":
        msgs = [
            _S.FetchRequest(),
            _S.FetchRequest(after_seq=1, limit=5, wait_ms=3, identity=a),
            _S.FetchRequest(after_seq=2**64 - 1, limit=2**32 - 1),
            _S.FetchRequest(identity=b),
        ]
    elif method == "qpc.v1.Delivery/Ack":
        msgs = [
            _S.AckRequest(up_to_seq=3),
            _S.AckRequest(up_to_seq=2**64 - 1, identity=a),
            _S.AckRequest(identity=b),
        ]
    elif method == "qpc.v1.Channel/Publish":
        now = system_wall_ms()

        def cmsg(n: int, **kw: Any) -> channel_pb2.ChannelMessage:
            fields: dict[str, Any] = {
                "channel_id": bytes([n]) * 32,
                "msg_id": n.to_bytes(16, "big"),
                "expiry_ms": now + 3_600_000,
                "hop_limit": 8,
                "sealed": bytes(28 + n * 37 % 700),
            }
            fields.update(kw)
            return channel_pb2.ChannelMessage(**fields)

        msgs = [
            channel_pb2.ChannelPublishRequest(message=cmsg(1)),
            channel_pb2.ChannelPublishRequest(message=cmsg(2, hop_limit=16)),
            channel_pb2.ChannelPublishRequest(message=cmsg(3, hop_limit=17)),
            channel_pb2.ChannelPublishRequest(message=cmsg(4, expiry_ms=2**64 - 1)),
            channel_pb2.ChannelPublishRequest(),
        ]
    elif method == "qpc.v1.Channel/Fetch":
        cur = channel_pb2.ChannelCursor
        msgs = [
            channel_pb2.ChannelFetchRequest(cursors=[cur(channel_id=b"\x01" * 32)]),
            channel_pb2.ChannelFetchRequest(
                cursors=[cur(channel_id=b"\x02" * 32, after_seq=1), cur(channel_id=b"\x01" * 32)],
                limit=5,
                wait_ms=3,
            ),
            channel_pb2.ChannelFetchRequest(
                cursors=[cur(channel_id=b"\x01" * 32, after_seq=2**64 - 1)], limit=2**32 - 1
            ),
            channel_pb2.ChannelFetchRequest(),
        ]
    else:  # pragma: no cover - METHODS and this table move together
        raise KeyError(method)
    return [m.SerializeToString() for m in msgs]


# -- targets -------------------------------------------------------------------------------


def _pick_conn(env: NodeEnv, data: bytes) -> MemoryConnection:
    """Mostly the authenticated session; 1 in 16 inputs (by length) arrives anonymously."""
    return env.anon if len(data) % 16 == 15 else env.authed


def body_target(env: NodeEnv, method: str) -> Callable[[bytes], Any]:
    response_type = METHODS[method][1]

    async def run(data: bytes) -> str:
        conn = _pick_conn(env, data)
        if method == "qpc.v1.Auth/Prove":
            conn = env.prover
            cid = next(env.call_ids)
            ch = check_response(
                await exchange(conn, request_frame("qpc.v1.Auth/Challenge", b"", cid)),
                call_id=cid,
            )
            if ch.status != StatusCode.OK:
                raise Invariant(f"Challenge refused: {ch.message}")
        cid = next(env.call_ids)
        raw = await exchange(conn, request_frame(method, data, cid))
        resp = check_response(raw, call_id=cid, response_type=response_type)
        return StatusCode(resp.status).name

    return run


def request_seeds(env: NodeEnv) -> list[bytes]:
    seeds = []
    for i, method in enumerate(METHODS):
        for body in body_seeds(env, method)[:2]:
            req = rpc_pb2.Request(
                version=WIRE_VERSION,
                method=method,
                call_id=i + 1,
                body=body,
                deadline_ms=[0, 1, 5000, 2**32 - 1][i % 4],
                correlation_id=["", "abc-1:2.3_x", "x" * 64][i % 3],
            )
            seeds.append(req.SerializeToString())
    return seeds + wire_fixtures("msg_request_")


def request_target(env: NodeEnv) -> Callable[[bytes], Any]:
    async def run(data: bytes) -> str:
        raw = await exchange(_pick_conn(env, data), encode_frame(data, max_frame_size=MAX_FRAME))
        return StatusCode(check_response(raw).status).name

    return run


def stream_seeds(env: NodeEnv) -> list[bytes]:
    framed = [encode_frame(r, max_frame_size=MAX_FRAME) for r in request_seeds(env)]
    return framed + wire_fixtures("frame_request_") + [framed[0] + framed[1], framed[2][:5]]


def stream_target(env: NodeEnv) -> Callable[[bytes], Any]:
    async def run(data: bytes) -> str:
        return StatusCode(check_response(await exchange(_pick_conn(env, data), data)).status).name

    return run


async def server_bounded(env: NodeEnv) -> None:
    """After a run: no call left running, no bytes held, the long-poll table empty."""
    for _ in range(1000):  # bounded wait for handle_stream tasks still closing
        if not env.server.statistics().active_calls:
            break
        await trio.sleep(0.01)  # polling a counter: there is no event to wait on
    st = env.server.statistics()
    if st.active_calls or st.buffered_bytes:
        raise Invariant(f"server still holds calls/bytes: {st}")
    if st.peak_buffered_bytes > MAX_FRAME + RECEIVE_CHUNK + 16:
        raise Invariant(f"server buffered {st.peak_buffered_bytes} bytes (cap {MAX_FRAME})")
    # One entry per identity that ever long-polled (only alice can here): a timed-out
    # wait leaves its Event behind (reported; memory grows with identities, not calls).
    if len(env.delivery.waiters) > 1:
        raise Invariant(f"{len(env.delivery.waiters)} parked-fetch entries left")
    for c in (env.authed, env.anon, env.prover):
        if c.state.active_calls:
            raise Invariant(f"{c.peer.connection_id}: {c.state.active_calls} active calls")


_COST = {"qpc.v1.Auth/Prove": 2.0, "qpc.v1.Directory/Upload": 2.0}

for _m in METHODS:
    register(
        "rpc.body." + _m.removeprefix("qpc.v1.").replace("/", ".").lower(),
        env="node",
        seeds=lambda env, m=_m: body_seeds(env, m),
        target=lambda env, m=_m: body_target(env, m),
        allowed=(),
        cost=_COST.get(_m, 1.0),
        finish=server_bounded,
    )
register(
    "rpc.request", env="node", seeds=request_seeds, target=request_target, allowed=(),
    finish=server_bounded,
)  # fmt: skip
register(
    "rpc.stream", env="node", seeds=stream_seeds, target=stream_target, allowed=(),
    finish=server_bounded,
)  # fmt: skip


# -- the other direction: a hostile node answering our RpcClient -----------------------


def response_seeds() -> list[bytes]:
    ok = rpc_pb2.Response(
        version=WIRE_VERSION,
        call_id=1,
        body=health_pb2.HealthResponse(
            status=health_pb2.HealthResponse.SERVING
        ).SerializeToString(),
    )
    err = rpc_pb2.Response(version=WIRE_VERSION, call_id=1, status=8, message="slow down")
    refused = rpc_pb2.Response(version=WIRE_VERSION, call_id=0, status=8, message="busy")
    seeds = [encode_frame(m.SerializeToString()) for m in (ok, err, refused)]
    return seeds + wire_fixtures("frame_response_")


async def client_response_target(data: bytes) -> str:
    async def open_stream() -> trio.abc.HalfCloseableStream:
        ours, node = memory_stream_pair()
        await node.send_all(data)
        await node.send_eof()
        return ours

    client = RpcClient(open_stream, retry_policy=RetryPolicy(max_attempts=1))
    await client.call(
        "qpc.v1.Health/Check", health_pb2.HealthRequest(), health_pb2.HealthResponse, timeout=5
    )
    return "OK"


register(
    "rpc.client_response",
    seeds=lambda _env: response_seeds(),
    target=lambda _env: client_response_target,
    allowed=(RpcError,),
)

"""Federation RPC bodies (qpc-fed/1), driven through the REAL Federation on a real store.

One environment ("fed") runs a :class:`Federation` (trust: mesh pins; routes:
a static table with a user homed here and one behind a neighbour) whose RPC
server answers on in-memory streams, as an admitted neighbour's connection.
Every answer must be one well-formed Response with a known, non-INTERNAL
status; an OK RelayEnqueue answers one result per envelope with a known
RelayStatus; afterwards no call is active and the server holds no buffers.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio
from google.protobuf.message import DecodeError, Message

from qpc_node.errors import QpcError
from qpc_node.federation.core import (
    _NODE_KEY,
    M_ANNOUNCE,
    M_KEYPACKAGE,
    M_PING,
    M_RELAY,
    Federation,
    FederationLimits,
)
from qpc_node.federation.routes import StaticRoutes
from qpc_node.federation.trust import MeshTrust, resolve_node_prefix
from qpc_node.ops.clock import system_wall_ms
from qpc_node.quic.tls import load_or_create_node_credentials
from qpc_node.rpc.context import PeerInfo
from qpc_node.rpc.inmemory import MemoryConnection
from qpc_node.store import AsyncStore, KeyPackageUpload
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2, ops_pb2
from tests.fuzz.h_rpc import check_response, exchange, request_frame
from tests.fuzz.registry import Invariant, environment, pure, register

F = federation_pb2
PEER = b"\x77" * 32
HERE_USER, FAR_USER, FAR_NODE = b"\xa1" * 32, b"\xb2" * 32, b"\xc3" * 32
METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    M_RELAY: (F.RelayEnqueueRequest, F.RelayEnqueueResponse),
    M_KEYPACKAGE: (F.ProxyKeyPackageFetchRequest, F.ProxyKeyPackageFetchResponse),
    M_ANNOUNCE: (F.AnnounceRequest, F.AnnounceResponse),
    M_PING: (F.PingRequest, F.PingResponse),
}
_STATUSES = frozenset(F.RelayStatus.values())


@dataclass(slots=True)
class FedEnv:
    fed: Federation
    store: AsyncStore
    peer: MemoryConnection
    call_ids: itertools.count[int]


@environment("fed")
@contextlib.asynccontextmanager
async def fed_env(tmp: Path) -> AsyncIterator[FedEnv]:
    server_log = logging.getLogger("qpc_node.rpc.server")
    was_disabled, server_log.disabled = server_log.disabled, True
    store = await AsyncStore.open(tmp / "node.db", synchronous="NORMAL")
    try:
        creds = load_or_create_node_credentials(tmp / "keys")
        fed = Federation(
            creds,
            store,
            MeshTrust(),
            StaticRoutes(b"\0" * 32, {}, {}),
            limits=FederationLimits(calls_per_second=1e9, call_burst=1e9, byte_burst=1e12),
            announce_sink=lambda node, payload: len(payload) % 2 == 0,
        )
        routes = StaticRoutes(fed.node_id, {HERE_USER: fed.node_id, FAR_USER: FAR_NODE})
        fed._resolve = routes
        await store.upload_keypackages(
            HERE_USER, [KeyPackageUpload(b"kp" * 40, 1, last_resort=True)], system_wall_ms()
        )
        async with trio.open_nursery() as nursery:
            peer = MemoryConnection(
                fed.rpc_server, nursery, PeerInfo("fuzz-peer", ("10.0.0.7", 4201), PEER)
            )
            peer.state.session.data[_NODE_KEY] = PEER
            try:
                yield FedEnv(fed, store, peer, itertools.count(1))
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
        server_log.disabled = was_disabled


def _env(n: int, recipient: bytes, **kw: int) -> envelope_pb2.Envelope:
    fields = {
        "msg_id": n.to_bytes(16, "big"),
        "recipient": recipient,
        "expiry_ms": system_wall_ms() + 3_600_000,
        "hop_limit": 4,
        "ciphertext": b"c" * (n * 37 % 300 + 1),
    }
    fields.update(kw)  # type: ignore[arg-type]
    return envelope_pb2.Envelope(**fields)  # type: ignore[arg-type]


def body_seeds(method: str) -> list[bytes]:
    msgs: list[Message]
    if method == M_RELAY:
        msgs = [
            F.RelayEnqueueRequest(envelopes=[_env(1, HERE_USER)]),
            F.RelayEnqueueRequest(envelopes=[_env(2, FAR_USER), _env(3, FAR_USER, hop_limit=0)]),
            F.RelayEnqueueRequest(
                envelopes=[_env(4, b"\x99" * 32), _env(5, HERE_USER, expiry_ms=1)]
            ),
            F.RelayEnqueueRequest(envelopes=[_env(6, FAR_USER, hop_limit=16)]),
            # Declared origins: a stranger's (judged by the fairness rule), an unknown
            # one (empty), a malformed one (its envelope alone is INVALID), and a
            # count that does not match the envelopes (the call is refused).
            F.RelayEnqueueRequest(
                envelopes=[_env(7, HERE_USER), _env(8, HERE_USER), _env(9, FAR_USER)],
                origins=[b"\x5a" * 32, b"", b"\x5a" * 31],
            ),
            F.RelayEnqueueRequest(envelopes=[_env(10, HERE_USER)], origins=[b"o" * 32] * 2),
            # Hand-over flags: one per envelope (a local and a relayed hand-over), and
            # a count that does not match the envelopes (the call is refused).
            F.RelayEnqueueRequest(
                envelopes=[_env(11, HERE_USER), _env(12, FAR_USER)], handover=[True, True]
            ),
            F.RelayEnqueueRequest(envelopes=[_env(13, FAR_USER)], handover=[True, False]),
        ]
    elif method == M_KEYPACKAGE:
        msgs = [F.ProxyKeyPackageFetchRequest(identity=x) for x in (HERE_USER, FAR_USER, b"x")]
    elif method == M_ANNOUNCE:
        msgs = [F.AnnounceRequest(payload=p) for p in (b"", b"ab", b"r" * 513)]
    else:
        msgs = [F.PingRequest(nonce=n) for n in (0, 1, 2**64 - 1)]
        # Boot ids: a well-formed one, too short / too long (ignored: not stated).
        msgs += [F.PingRequest(nonce=7, boot_id=b) for b in (b"\x01" * 16, b"x", b"y" * 33)]
    return [m.SerializeToString() for m in msgs]


def body_target(env: FedEnv, method: str) -> object:
    _, response_type = METHODS[method]

    async def target(data: bytes) -> str:
        call_id = next(env.call_ids)
        raw = await exchange(env.peer, request_frame(method, data, call_id))
        resp = check_response(raw, call_id=call_id, response_type=response_type)
        if resp.status == 0 and method == M_RELAY:
            req = F.RelayEnqueueRequest.FromString(data)
            out = F.RelayEnqueueResponse.FromString(resp.body)
            if len(out.results) != len(req.envelopes):
                raise Invariant("RelayEnqueue answered a different number of results")
            for r in out.results:
                if r.status not in _STATUSES or r.status == F.RELAY_STATUS_UNSPECIFIED:
                    raise Invariant(f"relay result with status {r.status}")
            if len(req.origins) not in (0, len(req.envelopes)):
                raise Invariant("RelayEnqueue took origins that do not match its envelopes")
            if len(req.handover) not in (0, len(req.envelopes)):
                raise Invariant("RelayEnqueue took hand-over flags that do not match")
            for origin, r in zip(req.origins, out.results, strict=False):
                if len(origin) not in (0, 32) and r.status != F.RELAY_INVALID:
                    raise Invariant(f"an origin of {len(origin)} bytes was taken")
        return "OK" if resp.status == 0 else f"status {resp.status}"

    return target


async def fed_bounded(env: FedEnv) -> None:
    s = env.fed.rpc_server.statistics()
    if s.active_calls or s.buffered_bytes:
        raise Invariant(f"federation server left {s.active_calls} calls, {s.buffered_bytes} B")


for _m in METHODS:
    register(
        "fed.body." + _m.removeprefix("qpc.v1.Federation/").lower(),
        env="fed",
        seeds=lambda _env, m=_m: body_seeds(m),
        target=lambda env, m=_m: body_target(env, m),
        allowed=(),
        finish=fed_bounded,
    )


# /mesh trust and `qpc trust`: the request a local client sends, and the prefix the
# node resolves against the node ids it knows (typed errors only: bad text,
# no match, ambiguous).
_TRUST_KNOWN = [bytes([i]) * 32 for i in (0x0A, 0x0B, 0xAB)] + [b"\x0a\x0b" + b"\x00" * 30]


def _trust_seeds() -> list[bytes]:
    texts = ["0a", "0b", "ab", "0a0b", "zz", "", "0A:0B", "ab" * 32, "f" * 65, "0a 0b"]
    return [ops_pb2.MeshTrustRequest(fingerprint=t).SerializeToString() for t in texts]


def _trust_target(data: bytes) -> str:
    request = ops_pb2.MeshTrustRequest.FromString(data)
    nid = resolve_node_prefix(request.fingerprint, _TRUST_KNOWN)
    if len(nid) != 32:
        raise Invariant(f"resolved a {len(nid)}-byte node id")
    return "resolved"


pure(
    "mesh.trust_request",
    seeds=_trust_seeds,
    target=_trust_target,
    allowed=(DecodeError, QpcError),
)

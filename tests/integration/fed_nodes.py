"""Federated nodes on loopback for the federation tests: real Node, QUIC, SQLite."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from qpc_node.demo import free_udp_port, loopback_node_config
from qpc_node.federation.core import (
    Federation,
    FederationLimits,
    FederationSetup,
    LinkTimers,
    StaticPeer,
)
from qpc_node.federation.routes import StaticRoutes
from qpc_node.mesh.nodeid import node_id_of_credentials
from qpc_node.node import KEYS_SUBDIR, Node, NodeInfo
from qpc_node.ops.clock import ManualWallClock, system_wall_ms
from qpc_node.quic.tls import NodeCredentials, load_or_create_node_credentials
from qpc_node.store import Envelope
from qpc_node.store.fairness import SenderKey
from qpc_node.storefwd.gossip import GossipLimits
from qpc_node.wire.gen.qpc.v1 import envelope_pb2
from tests.integration.node_harness import node_config

FAST = LinkTimers(
    ping_interval=0.3,
    ping_timeout=0.5,
    dead_after=1.5,
    redial_initial=0.05,
    redial_max=0.5,
    retry_initial=0.05,
    retry_max=0.5,
    call_timeout=5.0,
)


def node_dir(tmp: Path, name: str) -> Path:
    return tmp / name / "node"


def identity(tmp: Path, name: str) -> tuple[NodeCredentials, bytes]:
    """The node's key (made on first use, like the node does): and its node id."""
    creds = load_or_create_node_credentials(node_dir(tmp, name) / KEYS_SUBDIR)
    return creds, node_id_of_credentials(creds)


def install_credentials(tmp: Path, name: str, creds: NodeCredentials) -> None:
    """Drop an operator-made (e.g. CA-issued) pair into the node's key dir."""
    keys = node_dir(tmp, name) / KEYS_SUBDIR
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "node.crt").write_bytes(creds.certificate_pem + creds.chain_pem)
    (keys / "node.key").write_bytes(creds.private_key_pem)
    os.chmod(keys / "node.key", 0o600)


@dataclass
class FedNode:
    name: str
    node: Node
    info: NodeInfo
    node_id: bytes
    routes: StaticRoutes

    @property
    def fed(self) -> Federation:
        assert self.node.federation is not None
        return self.node.federation


@asynccontextmanager
async def fed_node(
    tmp: Path,
    name: str,
    *,
    routes: StaticRoutes | None = None,
    peers: tuple[StaticPeer, ...] = (),
    port: int = 0,
    mode: str = "mesh",
    ca_pem: bytes | None = None,
    limits: FederationLimits | None = None,
    timers: LinkTimers = FAST,
    wall: ManualWallClock | None = None,
    announce_sink: object = None,
    config: dict[str, dict[str, str]] | None = None,
    gossip_limits: GossipLimits | None = None,
) -> AsyncIterator[FedNode]:
    _, nid = identity(tmp, name)
    routes = routes if routes is not None else StaticRoutes(nid)
    setup = FederationSetup(
        resolve=routes,
        mode=mode,  # type: ignore[arg-type]
        ca_pem=ca_pem,
        static_peers=peers,
        limits=limits,
        timers=timers,
        announce_sink=announce_sink,  # type: ignore[arg-type]
        gossip_limits=gossip_limits,
    )
    sections = dict(config or {})
    sections["node"] = {
        "listen": f"127.0.0.1:{port}",
        "drain_grace_s": "0.2",
        **sections.get("node", {}),
    }
    cfg = node_config(tmp / name, **sections)
    node = Node(
        cfg,
        default_data=node_dir(tmp, name),
        wall_ms=wall if wall is not None else system_wall_ms,
        federation=setup,
    )
    async with trio.open_nursery() as nursery:
        info: NodeInfo = await nursery.start(node.run)
        yield FedNode(name, node, info, nid, routes)
        nursery.cancel_scope.cancel()


def envelope(
    msg_id: bytes, recipient: bytes, *, hop_limit: int = 8, expiry_ms: int | None = None
) -> envelope_pb2.Envelope:
    return envelope_pb2.Envelope(
        msg_id=msg_id,
        recipient=recipient,
        expiry_ms=expiry_ms or system_wall_ms() + 3_600_000,
        hop_limit=hop_limit,
        ciphertext=b"c" * 256,
    )


async def mailbox(node: FedNode, user: bytes) -> list[envelope_pb2.Envelope]:
    store = node.node.store
    assert store is not None
    res = await store.fetch(user, now_ms=system_wall_ms(), after_seq=0, limit=10_000)
    return [
        envelope_pb2.Envelope(
            msg_id=m.envelope.msg_id,
            recipient=m.envelope.recipient,
            expiry_ms=m.envelope.expiry_ms,
            hop_limit=m.envelope.hop_limit,
            ciphertext=m.envelope.ciphertext,
        )
        for m in res.messages
    ]


async def until(predicate: object, within: float = 10.0, step: float = 0.02) -> None:
    """Poll ``predicate`` (sync or async) until true; fail after ``within`` s (bounded)."""
    with trio.fail_after(within):
        while True:
            got = predicate()  # type: ignore[operator]
            if hasattr(got, "__await__"):
                got = await got
            if got:
                return
            await trio.sleep(step)


USER_C = b"\xcc" * 32
"""A user homed on C in the line topologies."""

USER_A = b"\xaa" * 32
"""A user homed on A: the proven origin of what A submits in the line topologies."""


async def wrote_to(node: FedNode, user: bytes, contact: bytes) -> None:
    """``user``, homed on ``node``, sends ``contact`` one message through its node's
    store as a local session would: from then on ``contact``'s mail to ``user`` is an
    accepted sender's, not a stranger's (store/fairness.py)."""
    store = node.node.store
    assert store is not None
    now = system_wall_ms()
    env = Envelope(os.urandom(16), contact, now + 3_600_000, 8, b"hello" * 8)
    await store.enqueue([env], now, sender=SenderKey.local(user))


def peer(port: int, nid: bytes) -> StaticPeer:
    return StaticPeer("127.0.0.1", port, nid)


@asynccontextmanager
async def line_abc(
    tmp: Path, *, a_direct_to_c: bool = False, b_port: int = 0, **b_kw: object
) -> AsyncIterator[tuple[FedNode, FedNode, FedNode]]:
    """A - B - C (A and C share no link unless ``a_direct_to_c``); USER_C homed on C;
    A routes C's users via B. Yields once A's link to B is up."""
    _, a_id = identity(tmp, "a")
    _, b_id = identity(tmp, "b")
    _, c_id = identity(tmp, "c")
    async with (
        fed_node(tmp, "c", routes=StaticRoutes(c_id, {USER_C: c_id})) as c,
        fed_node(
            tmp,
            "b",
            routes=StaticRoutes(b_id, {USER_C: c_id}),
            peers=(peer(c.info.port, c_id),),
            port=b_port,
            **b_kw,  # type: ignore[arg-type]
        ) as b,
        fed_node(
            tmp,
            "a",
            routes=StaticRoutes(a_id, {USER_C: c_id}, via={c_id: b_id}),
            peers=(peer(b.info.port, b_id),)
            + ((peer(c.info.port, c_id),) if a_direct_to_c else ()),
        ) as a,
    ):
        await a.fed.wait_link(b_id)
        await b.fed.wait_link(c_id)
        yield a, b, c


free_port = free_udp_port


@asynccontextmanager
async def mesh_node(
    tmp: Path,
    name: str,
    port: int,
    peers: list[tuple[int, bytes]],
    **sections: dict[str, str],
) -> AsyncIterator[tuple[Node, NodeInfo]]:
    """A node configured like an operator would: listen address and static peers
    (port, node id) on loopback, mDNS off, and any other ``sections`` of config;
    its keys are those :func:`identity` made."""
    data = node_dir(tmp, name)
    node = Node(loopback_node_config(data, port, peers, **sections), default_data=data)
    async with trio.open_nursery() as nursery:
        info: NodeInfo = await nursery.start(node.run)
        yield node, info
        nursery.cancel_scope.cancel()

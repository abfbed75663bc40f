"""The mesh service's pure pieces: relay answers as Enqueue results, link addresses,
static peers' addresses."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from qpc_node.errors import QpcError, StatusCode
from qpc_node.federation.links import LinkEvent
from qpc_node.mesh.peers import PeerAddress
from qpc_node.mesh.routing import Send
from qpc_node.mesh.service import (
    MeshService,
    MeshSettings,
    NoRouteYet,
    _enqueue_result,
    _peer_address,
    _static_addresses,
)
from qpc_node.mesh.static_peers import parse_static_peer
from qpc_node.ops.clock import ManualWallClock
from qpc_node.quic.tls import load_or_create_node_credentials
from qpc_node.store import AsyncStore
from qpc_node.store.records import EnqueueResult
from qpc_node.wire.gen.qpc.v1 import federation_pb2 as F

MSG = bytes(range(16))


def _r(status: int, detail: str = "") -> F.RelayResult:
    return F.RelayResult(msg_id=MSG, status=status, detail=detail)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "duplicate"),
    [(F.RELAY_QUEUED, False), (F.RELAY_STORED_LOCAL, False), (F.RELAY_DUPLICATE, True)],
)
def test_custody_taken_is_ok(status: int, duplicate: bool) -> None:
    got = _enqueue_result(_r(status))
    assert got == EnqueueResult(msg_id=MSG, seq=0, duplicate=duplicate)


def test_held_is_ok_and_says_held() -> None:
    got = _enqueue_result(_r(F.RELAY_HELD, "held until a route appears"))
    assert got == EnqueueResult(msg_id=MSG, seq=0, duplicate=False, held=True)


@pytest.mark.parametrize(
    ("status", "code", "retriable"),
    [
        (F.RELAY_NO_ROUTE, StatusCode.UNAVAILABLE, True),
        (F.RELAY_QUEUE_FULL, StatusCode.RESOURCE_EXHAUSTED, True),
        (F.RELAY_LOOP, StatusCode.UNAVAILABLE, True),
        (F.RELAY_HOP_LIMIT_EXCEEDED, StatusCode.FAILED_PRECONDITION, False),
        (F.RELAY_EXPIRED, StatusCode.INVALID_ARGUMENT, False),
        (F.RELAY_EXPIRY_TOO_FAR, StatusCode.INVALID_ARGUMENT, False),
        (F.RELAY_INVALID, StatusCode.INVALID_ARGUMENT, False),
        (F.RELAY_REFUSED, StatusCode.RESOURCE_EXHAUSTED, True),
        (F.RELAY_STATUS_UNSPECIFIED, StatusCode.INTERNAL, False),
    ],
)
def test_refusals_are_typed(status: int, code: StatusCode, retriable: bool) -> None:
    got = _enqueue_result(_r(status, "why"))
    assert isinstance(got, QpcError)
    assert got.code == code and got.code.retriable is retriable
    if status == F.RELAY_NO_ROUTE:
        assert isinstance(got, NoRouteYet) and "no route yet" in got.message


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10.0.0.1:4201", PeerAddress("10.0.0.1", 4201)),
        ("[fe80::1%3]:4201", PeerAddress("fe80::1", 4201, 3)),
        ("[2001:db8::1]:9", PeerAddress("2001:db8::1", 9)),
        ("[fe80::1]:4201", None),  # link-local without its interface names nothing
        ("node.local:4201", None),
        ("10.0.0.1:x", None),
        ("", None),
    ],
)
def test_link_address_of_an_inbound_peer(text: str, want: PeerAddress | None) -> None:
    assert _peer_address(text) == want


class _Resolver(trio.abc.HostnameResolver):
    """What the system resolver answers for a router's name on an IPv6 mesh (as
    nss-mdns does for ``router.local``): a link-local address with its interface
    index in the sockaddr, a global one, an IPv4 one."""

    def __init__(self, answers: list[tuple[Any, ...]]) -> None:
        self.answers = answers

    async def getaddrinfo(
        self, host: bytes | None, port: bytes | str | int | None, *args: Any, **kw: Any
    ) -> list[tuple[Any, ...]]:
        assert host == b"router.mesh"
        return self.answers

    async def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int) -> tuple[str, str]:
        raise OSError("not used")


async def test_static_peer_by_name_keeps_the_scope_of_a_link_local_answer() -> None:
    """A static peer given by name that resolves to ``fe80::`` must keep the
    interface index the resolver gave (fails before: the link-local answer was
    dropped as unscoped, leaving only the other families)."""
    v6, v4, dgram = socket.AF_INET6, socket.AF_INET, socket.SOCK_DGRAM
    trio.socket.set_custom_hostname_resolver(
        _Resolver(
            [
                (v6, dgram, 17, "", ("fe80::1", 4201, 0, 7)),
                (v6, dgram, 17, "", ("2001:db8::5", 4201, 0, 0)),
                (v4, dgram, 17, "", ("10.0.0.5", 4201)),
                (v6, dgram, 17, "", ("fe80::2", 4201, 0, 0)),  # unscoped: names nothing
            ]
        )
    )
    sp = parse_static_peer(f"router.mesh:4201#{'ab' * 32}")
    assert await _static_addresses(sp) == (
        PeerAddress("fe80::1", 4201, 7),
        PeerAddress("2001:db8::5", 4201),
        PeerAddress("10.0.0.5", 4201),
    )


async def test_a_replaced_link_makes_routing_start_over_with_the_new_incarnation(
    tmp_path: Path,
) -> None:
    """An ``up`` event with ``replaced`` (the federation saw a new boot id on a new
    connection to a neighbour already up) must re-run the routing core's link_up: the
    new process gets the full table at once (fails before: a second "up" for a linked
    neighbour was ignored, so nothing was sent until the periodic full table)."""
    creds = load_or_create_node_credentials(tmp_path / "keys")
    store = await AsyncStore.open(tmp_path / "node.db")
    try:
        wall = ManualWallClock(1_800_000_000_000)
        svc = MeshService(creds, store, MeshSettings(), is_local=lambda _u: False, wall_ms=wall)
        nb = bytes(range(32))

        def sent_to_nb(within_ms: int) -> list[Send]:
            """What the core sends ``nb`` over the next ``within_ms`` (virtual time)."""
            got: list[Send] = []
            for _ in range(within_ms // 50):
                wall.advance(50)
                out = svc.router.poll(wall())
                got += [o for o in out if isinstance(o, Send) and o.neighbour == nb]
            return got

        def own_route(sends: list[Send]) -> bool:
            return any(r.origin == svc.node_id for s in sends for r in s.update.routes)

        svc._on_link(LinkEvent("up", nb, "127.0.0.1:4201", None))
        assert own_route(sent_to_nb(2_500))  # the full table, at once
        assert sent_to_nb(3_000) == []  # nothing new (the periodic one is >= 22.5 s away)
        svc._on_link(LinkEvent("up", nb, "127.0.0.1:4201", None, replaced=True))
        assert own_route(sent_to_nb(2_500))  # the new incarnation gets it all again
    finally:
        await store.aclose()

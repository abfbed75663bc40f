"""The mesh service's pure pieces: relay answers as Enqueue results, link addresses."""

from __future__ import annotations

import pytest

from qpc_node.errors import QpcError, StatusCode
from qpc_node.mesh.peers import PeerAddress
from qpc_node.mesh.service import NoRouteYet, _enqueue_result, _peer_address
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


@pytest.mark.parametrize(
    ("status", "code", "retriable"),
    [
        (F.RELAY_NO_ROUTE, StatusCode.UNAVAILABLE, True),
        (F.RELAY_QUEUE_FULL, StatusCode.RESOURCE_EXHAUSTED, True),
        (F.RELAY_LOOP, StatusCode.UNAVAILABLE, True),
        (F.RELAY_HOP_LIMIT_EXCEEDED, StatusCode.FAILED_PRECONDITION, False),
        (F.RELAY_EXPIRED, StatusCode.INVALID_ARGUMENT, False),
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

"""ByteBudget: node-wide cap, per-source share, the small-frame floor."""

from __future__ import annotations

import pytest

from qpc_node.errors import ConfigError
from qpc_node.rpc.budget import ByteBudget
from qpc_node.rpc.context import PeerInfo
from qpc_node.rpc.server import budget_source


def test_share_and_total_both_bound_and_refusals_are_counted() -> None:
    b = ByteBudget(100, 60, floor=5)
    assert b.try_reserve("a", 60)
    assert not b.try_reserve("a", 10)  # a's share is full
    assert b.try_reserve("b", 40)
    assert not b.try_reserve("c", 10)  # the node is full
    assert b.try_reserve("c", 5)  # at the floor: always, and counted
    st = b.statistics()
    assert (st.used, st.peak, st.refused, st.refused_bytes, st.sources) == (105, 105, 2, 20, 3)
    b.release("a", 60)
    assert b.try_reserve("c", 10) and b.held_by("a") == 0
    with pytest.raises(ValueError):
        b.release("b", 41)


def test_a_share_larger_than_the_total_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        ByteBudget(10, 11)


@pytest.mark.parametrize(
    ("addr", "source"),
    [
        ("127.0.0.2", "127.0.0.2"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("fe80::1%mesh0", "fe80::/64"),
    ],
)
def test_sources_are_ips_and_ipv6_64s(addr: str, source: str) -> None:
    assert budget_source(PeerInfo("c1", remote_address=(addr, 4201))) == source


def test_without_an_address_the_connection_is_the_source() -> None:
    assert budget_source(PeerInfo("mem-7")) == "mem-7"

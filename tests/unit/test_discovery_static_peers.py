"""Static peer entries (``host:port#fingerprint``): every shape an operator writes, and
every slip gets a typed error naming the entry."""

from __future__ import annotations

import pytest

from qpc_node.errors import ConfigError, LocalProtocolError
from qpc_node.mesh.static_peers import (
    BadStaticPeer,
    StaticPeer,
    parse_static_peer,
    parse_static_peers,
)

FPR = "ab" * 32
NODE = bytes.fromhex(FPR)


def nametoindex(name: str) -> int:
    if name == "mesh0":
        return 7
    raise OSError(f"no such interface {name}")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (f"10.0.0.1:4300#{FPR}", StaticPeer("10.0.0.1", 4300, NODE)),
        (f"10.0.0.1#{FPR}", StaticPeer("10.0.0.1", 4201, NODE)),
        (f"Router-3.FFXYZ.net:4201#{FPR}", StaticPeer("router-3.ffxyz.net", 4201, NODE)),
        (f"[2001:db8::1]:4201#{FPR}", StaticPeer("2001:db8::1", 4201, NODE)),
        (f"[2001:db8::1]#{FPR.upper()}", StaticPeer("2001:db8::1", 4201, NODE)),
        (f"[fe80::1%mesh0]:4202#{FPR}", StaticPeer("fe80::1", 4202, NODE, "mesh0")),
        (f" [fe80::1%3]:4202 # {':'.join([FPR[i : i + 4] for i in range(0, 64, 4)])}",
         StaticPeer("fe80::1", 4202, NODE, "3")),
    ],
)  # fmt: skip
def test_parses_and_round_trips(entry: str, expected: StaticPeer) -> None:
    got = parse_static_peer(entry)
    assert got == expected
    assert parse_static_peer(str(got)) == got


def test_link_local_scope_resolves_when_dialling() -> None:
    peer = parse_static_peer(f"[fe80::1%mesh0]:4202#{FPR}")
    assert peer.address(if_nametoindex=nametoindex) == ("fe80::1", 4202, 0, 7)
    assert parse_static_peer(f"10.0.0.1:1#{FPR}").address() == ("10.0.0.1", 1)
    assert parse_static_peer(f"node.example:1#{FPR}").address() is None
    gone = parse_static_peer(f"[fe80::1%wlan9]:4202#{FPR}")  # valid config, iface not up yet
    with pytest.raises(LocalProtocolError, match="wlan9"):
        gone.address(if_nametoindex=nametoindex)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("10.0.0.1:4201", "missing '#nodefingerprint'"),
        ("10.0.0.1:4201#abcd", "64 hex digits"),
        (f"10.0.0.1:4201#{'zz' * 32}", "64 hex digits"),
        (f"10.0.0.1:0#{FPR}", "port must be"),
        (f"10.0.0.1:65536#{FPR}", "port must be"),
        (f"10.0.0.1:http#{FPR}", "port must be"),
        (f"10.0.0.1:#{FPR}", "port must be"),
        (f"2001:db8::1#{FPR}", "in brackets"),
        (f"fe80::1:4201#{FPR}", "in brackets"),
        (f"[2001:db8::1:4201#{FPR}", "unclosed"),
        (f"[2001:db8::1]x#{FPR}", "junk after"),
        (f"[fe80::1]:4201#{FPR}", "needs its interface"),
        (f"[2001:db8::1%mesh0]:4201#{FPR}", "only makes sense on fe80"),
        (f"[fe80::1%]:4201#{FPR}", "bad interface scope"),
        (f"[fe80::1%m1%mesh0]:4201#{FPR}", "bad interface scope"),  # found by fuzzing
        (f"[fe80::1%\x0bmesh0]:4201#{FPR}", "bad interface scope"),  # found by fuzzing
        (f"[10.0.0.1]:4201#{FPR}", "no brackets"),
        (f"[router]:4201#{FPR}", "not an IPv6 address"),
        (f"rou ter:4201#{FPR}", "bad host name"),
        (f":4201#{FPR}", "no host"),
        ("x" * 1000, "characters"),
    ],
)
def test_bad_entries_get_a_typed_error_naming_the_problem(entry: str, match: str) -> None:
    with pytest.raises(BadStaticPeer, match=match) as info:
        parse_static_peer(entry)
    assert isinstance(info.value, ConfigError)


def test_non_string_is_a_typed_error() -> None:
    with pytest.raises(BadStaticPeer):
        parse_static_peer(4201)  # type: ignore[arg-type]


def test_list_allows_multihomed_node_but_not_a_repeated_entry() -> None:
    two = parse_static_peers([f"10.0.0.1:4201#{FPR}", f"[fe80::1%mesh0]:4201#{FPR}"])
    assert [p.host for p in two] == ["10.0.0.1", "fe80::1"]
    with pytest.raises(BadStaticPeer, match="twice"):
        parse_static_peers([f"10.0.0.1:4201#{FPR}", f"10.0.0.1#{FPR}"])

"""mDNS discovery core: TXT parsing, address mapping, the per-node view and its events.

TXT rdata is built with zeroconf's own ``ServiceInfo`` (what a real peer sends) or by
hand where a hostile peer would send something zeroconf never builds.
"""

from __future__ import annotations

import pytest
import trio
from zeroconf import ServiceInfo

from qpc_node.errors import LocalProtocolError
from qpc_node.mesh.discovery import DiscoveryConfig, MdnsDiscovery
from qpc_node.mesh.discovery_core import (
    SERVICE_TYPE,
    BadRecord,
    BadTxtRecord,
    DiscoveryCore,
    PeerAddress,
    PeerGone,
    PeerSeen,
    PeerTxt,
    PeerUpdated,
    ResolvedService,
    map_addresses,
    parse_txt,
)

OWN = bytes(range(32))
A = bytes([0xAA]) * 32
B = bytes([0xBB]) * 32


def txt_of(props: dict[str, str | None]) -> bytes:
    return bytes(ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", properties=props).text)


def raw_txt(*items: bytes) -> bytes:
    return b"".join(bytes([len(i)]) + i for i in items)


def svc(
    node: bytes, *addrs: str, name: str = "", port: int = 4201, **extra: str
) -> ResolvedService:
    props: dict[str, str | None] = {"ver": "1", "node": node.hex(), "port": str(port), **extra}
    return ResolvedService(name or f"qpc-{node.hex()[:16]}.{SERVICE_TYPE}", txt_of(props), addrs)


def test_txt_round_trips_through_zeroconf() -> None:
    txt = PeerTxt(1, A, 4300, "ffxyz.net")
    assert parse_txt(txt_of(dict(txt.encode()))) == txt
    assert parse_txt(txt_of({"ver": "1", "node": A.hex().upper(), "port": "1"})).domain is None


def test_txt_rules_of_rfc6763() -> None:
    # keys are case-insensitive, the first occurrence wins, unknown keys are ignored,
    # a string starting with '=' is skipped
    text = raw_txt(b"=junk", b"VER=2", b"ver=9", b"Node=" + A.hex().encode(), b"port=7", b"x=y")
    assert parse_txt(text) == PeerTxt(2, A, 7, None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (raw_txt(b"ver=1", b"port=4201"), BadRecord.MISSING_FIELD),
        (raw_txt(b"ver=1", b"node", b"port=4201"), BadRecord.MISSING_FIELD),  # boolean attr
        (b"", BadRecord.MISSING_FIELD),
        (raw_txt(b"ver=x", b"node=" + A.hex().encode(), b"port=1"), BadRecord.BAD_VERSION),
        (raw_txt(b"ver=0", b"node=" + A.hex().encode(), b"port=1"), BadRecord.BAD_VERSION),
        (raw_txt(b"ver=" + b"9" * 200, b"node=" + A.hex().encode(), b"port=1"), BadRecord.BAD_VERSION),
        (raw_txt(b"ver=-1", b"node=" + A.hex().encode(), b"port=1"), BadRecord.BAD_VERSION),
        (raw_txt(b"ver=1", b"node=" + b"g" * 64, b"port=1"), BadRecord.BAD_NODE),
        (raw_txt(b"ver=1", b"node=abcd", b"port=1"), BadRecord.BAD_NODE),
        (raw_txt(b"ver=1", b"node=" + "é".encode() * 32, b"port=1"), BadRecord.BAD_NODE),
        (raw_txt(b"ver=1", b"node=" + A.hex().encode(), b"port=0"), BadRecord.BAD_PORT),
        (raw_txt(b"ver=1", b"node=" + A.hex().encode(), b"port=65536"), BadRecord.BAD_PORT),
        (raw_txt(b"ver=1", b"node=" + A.hex().encode(), b"port= 80"), BadRecord.BAD_PORT),
        (raw_txt(b"ver=1", b"node=" + A.hex().encode(), b"port=1", b"domain=a..b"), BadRecord.BAD_DOMAIN),
        (raw_txt(b"ver=1", b"node=" + A.hex().encode(), b"port=1", b"domain=a_b"), BadRecord.BAD_DOMAIN),
        (raw_txt(b"ver=1", b"node=" + A.hex().encode(), b"port=1", b"domain=\xff"), BadRecord.BAD_DOMAIN),
        (raw_txt(*[b"k%d=" % i + b"v" * 200 for i in range(8)]), BadRecord.OVERSIZE),
        (b"\x09ver=1", BadRecord.MALFORMED),  # length runs past the end
        (raw_txt(b"v\xffr=1"), BadRecord.MALFORMED),
    ],
)  # fmt: skip
def test_bad_txt_is_a_typed_error(text: bytes, reason: BadRecord) -> None:
    with pytest.raises(BadTxtRecord) as info:
        parse_txt(text)
    assert info.value.reason is reason


def test_addresses_ipv6_first_scope_kept_unusable_dropped() -> None:
    got = map_addresses(
        ["10.0.0.2", "2001:db8::2", "fe80::2%3", "fe80::9", "127.0.0.1", "::1", "::", "ff02::fb",
         "::ffff:10.0.0.3", "fe80::2%3", "not-an-ip"],
        4300,
    )  # fmt: skip
    assert got == (
        PeerAddress("fe80::2", 4300, 3),
        PeerAddress("2001:db8::2", 4300, 0),
        PeerAddress("10.0.0.2", 4300, 0),
        PeerAddress("10.0.0.3", 4300, 0),
    )
    assert got[0].to_address() == ("fe80::2", 4300, 0, 3)
    assert got[2].to_address() == ("10.0.0.2", 4300)
    # a link-local heard on an interface we were not told to use is not reachable by us
    assert map_addresses(["fe80::2%3", "fe80::4%5"], 1, allowed_scopes=frozenset({5})) == (
        PeerAddress("fe80::4", 1, 5),
    )


def test_seen_updated_gone_keyed_by_node() -> None:
    core = DiscoveryCore(OWN)
    ev = core.resolved(svc(A, "fe80::a%2", "10.0.0.1"), 1.0)
    assert ev == [
        PeerSeen(
            A,
            (PeerAddress("fe80::a", 4201, 2), PeerAddress("10.0.0.1", 4201, 0)),
            PeerTxt(1, A, 4201),
            f"qpc-{A.hex()[:16]}.{SERVICE_TYPE}",
            1.0,
        )
    ]
    assert core.resolved(svc(A, "10.0.0.1", "fe80::a%2"), 2.0) == []  # same content
    (up,) = core.resolved(svc(A, "fe80::a%2", port=4400), 3.0)
    assert isinstance(up, PeerUpdated) and up.addresses == (PeerAddress("fe80::a", 4400, 2),)
    assert (
        core.removed(f"QPC-{A.hex()[:16]}.{SERVICE_TYPE}", 4.0)
        == [  # DNS names: any case
            PeerGone(A, f"qpc-{A.hex()[:16]}.{SERVICE_TYPE}", 4.0)
        ]
    )
    assert core.removed("unknown." + SERVICE_TYPE, 5.0) == []
    st = core.statistics()
    assert (st.peers, st.seen, st.updated, st.gone) == (0, 1, 1, 1)
    with pytest.raises(AttributeError):  # a frozen record
        st.peers = 3  # type: ignore[misc]


def test_bad_records_are_counted_never_raised_and_keep_the_old_view() -> None:
    core = DiscoveryCore(OWN)
    core.resolved(svc(A, "10.0.0.1"), 1.0)
    name = f"qpc-{A.hex()[:16]}.{SERVICE_TYPE}"
    hostile = [
        ResolvedService(name, raw_txt(b"ver=1", b"node=nothex", b"port=1"), ("10.0.0.1",)),
        ResolvedService(name, b"\xff" * 2000, ("10.0.0.1",)),
        ResolvedService("b." + SERVICE_TYPE, txt_of({"ver": "1", "node": B.hex(), "port": "1"}),
                        ("127.0.0.1", "fe80::1")),
    ]  # fmt: skip
    for bad in hostile:
        assert core.resolved(bad, 2.0) == []
    st = core.statistics()
    assert st.bad_records == 3
    assert dict(st.bad_by_reason) == {"bad_node": 1, "oversize": 1, "no_address": 1}
    assert list(core.peers()) == [A]


def test_own_announcement_filtered_by_name_and_node_id() -> None:
    core = DiscoveryCore(OWN)
    core.add_own_name("me." + SERVICE_TYPE)
    assert core.resolved(svc(B, "10.0.0.9", name="ME." + SERVICE_TYPE), 1.0) == []
    assert core.resolved(svc(OWN, "10.0.0.1", name="other." + SERVICE_TYPE), 1.0) == []
    assert core.statistics().own_filtered == 2 and core.peers() == {}


def test_one_node_under_two_names_is_gone_only_after_its_last_goodbye() -> None:
    core = DiscoveryCore(OWN)
    (seen,) = core.resolved(svc(A, "10.0.0.1", name="a." + SERVICE_TYPE), 1.0)
    assert isinstance(seen, PeerSeen)
    (up,) = core.resolved(svc(A, "10.0.0.2", name="a-2." + SERVICE_TYPE), 2.0)
    assert isinstance(up, PeerUpdated) and up.addresses[0].host == "10.0.0.2"
    (back,) = core.removed("a-2." + SERVICE_TYPE, 3.0)  # current one left: fall back
    assert isinstance(back, PeerUpdated) and back.addresses[0].host == "10.0.0.1"
    assert core.removed("a." + SERVICE_TYPE, 4.0) == [PeerGone(A, "a." + SERVICE_TYPE, 4.0)]


def test_name_taken_over_by_another_node_is_gone_then_seen() -> None:
    core = DiscoveryCore(OWN)
    core.resolved(svc(A, "10.0.0.1", name="n." + SERVICE_TYPE), 1.0)
    gone, seen = core.resolved(svc(B, "10.0.0.1", name="n." + SERVICE_TYPE), 2.0)
    assert isinstance(gone, PeerGone) and gone.node_id == A
    assert isinstance(seen, PeerSeen) and seen.node_id == B


def test_table_is_bounded() -> None:
    core = DiscoveryCore(OWN, max_instances=2)
    for i in range(5):
        core.resolved(svc(bytes([i + 1]) * 32, "10.0.0.1"), 1.0)
    st = core.statistics()
    assert (st.peers, st.table_full) == (2, 3)


@pytest.mark.parametrize(
    "kw",
    [
        {"node_id": b"short"},
        {"port": 0},
        {"port": 70000},
        {"version": 0},
        {"interfaces": ()},
        {"domain": "bad domain"},
        {"domain": "é.example"},
        {"shutdown_timeout_s": 0},
    ],
)
def test_config_refuses_what_peers_would_refuse(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"node_id": A, "port": 4201, **kw}
    with pytest.raises(LocalProtocolError):
        DiscoveryConfig(**args)  # type: ignore[arg-type]


def test_config_txt_is_what_peers_parse() -> None:
    cfg = DiscoveryConfig(node_id=A, port=4300, domain="ffxyz.net")
    assert parse_txt(txt_of(dict(cfg.txt.encode()))) == PeerTxt(1, A, 4300, "ffxyz.net")
    assert len(cfg.instance_name.split(".")[0]) <= 63


async def test_local_only_touches_no_network() -> None:
    disc = MdnsDiscovery(DiscoveryConfig(node_id=A, port=4201, local_only=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(disc.run)
        assert disc.statistics().interfaces == () and not disc.statistics().announced
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.EndOfChannel):
        await disc.events.receive()  # closed: the consumer's loop ends


def test_peer_address_display() -> None:
    assert str(PeerAddress("10.0.0.1", 4201, 0)) == "10.0.0.1:4201"
    assert str(PeerAddress("2001:db8::1", 4201, 0)) == "[2001:db8::1]:4201"
    assert str(PeerAddress("fe80::1", 4201, 1)) == "[fe80::1%lo]:4201"  # index 1 is lo
    assert str(PeerAddress("fe80::1", 4201, 99999)) == "[fe80::1%99999]:4201"


def test_chosen_interfaces_keep_only_on_link_addresses() -> None:
    """A peer heard on an interface we were told not to use (another mDNS program on
    the host joined the group there) must not enter the view."""
    import ipaddress

    nets = (ipaddress.ip_network("10.1.1.0/24"), ipaddress.ip_network("2001:db8:1::/64"))
    core = DiscoveryCore(OWN, allowed_scopes=frozenset({3}), allowed_networks=nets)
    (seen,) = core.resolved(
        svc(A, "10.1.0.7", "10.1.1.7", "fe80::7%2", "fe80::7%3", "2001:db8:2::7", "2001:db8:1::7"),
        1.0,
    )
    assert [a.host for a in seen.addresses] == ["fe80::7", "2001:db8:1::7", "10.1.1.7"]
    assert core.resolved(svc(B, "10.1.0.8", "fe80::8%2", "2001:db8:2::8"), 1.0) == []
    assert dict(core.statistics().bad_by_reason) == {"no_address": 1}


async def test_open_discovery_local_only_yields_a_quiet_service() -> None:
    from qpc_node.mesh.discovery import open_discovery

    async with open_discovery(DiscoveryConfig(node_id=A, port=4201, local_only=True)) as disc:
        assert disc.peers() == {}
        with trio.move_on_after(0.05) as cs:
            await disc.events.receive()
        assert cs.cancelled_caught  # nothing announced, nothing heard

"""Address parsing for a dual-stack mesh node (no sockets needed)."""

from __future__ import annotations

import socket

import pytest

from qpc_node.errors import LocalProtocolError
from qpc_node.quic.address import canonical, format_address, parse_literal, split_scope, to_sockaddr

IFACES = {"mesh0": 7, "wlan-mesh": 12}


def fake_nametoindex(name: str) -> int:
    try:
        return IFACES[name]
    except KeyError:
        raise OSError(19, "No such device") from None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("fe80::1%mesh0", ("fe80::1", 7)),
        ("[fe80::1%wlan-mesh]", ("fe80::1", 12)),
        ("fe80::1%3", ("fe80::1", 3)),
        ("2001:db8::1", ("2001:db8::1", 0)),
        ("10.0.0.1", ("10.0.0.1", 0)),
    ],
)
def test_split_scope(host: str, expected: tuple[str, int]) -> None:
    assert split_scope(host, if_nametoindex=fake_nametoindex) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 4201)),
        ("::1", ("::1", 4201, 0, 0)),
        ("[2001:DB8::1]", ("2001:db8::1", 4201, 0, 0)),
        ("fe80::1%mesh0", ("fe80::1", 4201, 0, 7)),
        ("::ffff:192.0.2.7", ("192.0.2.7", 4201)),
        ("node.example", None),
    ],
)
def test_parse_literal(host: str, expected: object) -> None:
    assert parse_literal(host, 4201, if_nametoindex=fake_nametoindex) == expected


@pytest.mark.parametrize(
    "host", ["fe80::1", "fe80::1%nope0", "fe80::1%", "10.0.0.1%mesh0", "name%mesh0"]
)
def test_parse_literal_refuses(host: str) -> None:
    with pytest.raises(LocalProtocolError):
        parse_literal(host, 4201, if_nametoindex=fake_nametoindex)


def test_real_interface_scope_resolves() -> None:
    index = socket.if_nametoindex("lo")
    assert parse_literal("fe80::1%lo", 1) == ("fe80::1", 1, 0, index)


def test_port_range_checked() -> None:
    with pytest.raises(LocalProtocolError):
        parse_literal("127.0.0.1", 70000)


def test_canonical_unmaps_v4_and_keeps_scope() -> None:
    assert canonical(("::ffff:10.1.2.3", 9, 0, 0)) == ("10.1.2.3", 9)
    assert canonical(("fe80::1%mesh0", 9, 0, 7)) == ("fe80::1", 9, 0, 7)
    assert canonical(("10.1.2.3", 9)) == ("10.1.2.3", 9)


def test_to_sockaddr_per_family() -> None:
    assert to_sockaddr(("10.1.2.3", 9), socket.AF_INET6) == ("::ffff:10.1.2.3", 9, 0, 0)
    assert to_sockaddr(("10.1.2.3", 9), socket.AF_INET) == ("10.1.2.3", 9)
    with pytest.raises(LocalProtocolError):
        to_sockaddr(("::1", 9, 0, 0), socket.AF_INET)


def test_format_address() -> None:
    assert format_address(("10.1.2.3", 9)) == "10.1.2.3:9"
    assert format_address(("fe80::1", 9, 0, 7)) == "[fe80::1%7]:9"

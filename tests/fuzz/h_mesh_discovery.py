"""Mesh discovery inputs: what any host on the link can announce by mDNS, and the
static peer entries an operator writes in config/UCI."""

from __future__ import annotations

from zeroconf import ServiceInfo

from qpc_node.errors import ConfigError
from qpc_node.mesh.discovery_core import (
    SERVICE_TYPE,
    BadTxtRecord,
    DiscoveryCore,
    PeerTxt,
    ResolvedService,
    parse_txt,
)
from qpc_node.mesh.static_peers import StaticPeer, parse_static_peer
from tests.fuzz.registry import Invariant, pure

FPR = "ab" * 32
NODE = bytes.fromhex(FPR)


def _txt(props: dict[str, str | None]) -> bytes:
    return bytes(ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", properties=props).text)


def _txt_seeds() -> list[bytes]:
    good = PeerTxt(1, NODE, 4201, "ffxyz.net").encode()
    return [
        _txt(dict(good)),
        _txt({"ver": "1", "node": FPR, "port": "4201"}),
        _txt({"ver": "2", "node": FPR.upper(), "port": "65535", "x": None, "y": ""}),
        _txt({"ver": "1", "port": "4201"}),
        b"",
    ]


def txt_target(data: bytes) -> PeerTxt:
    txt = parse_txt(data)
    if parse_txt(_txt(dict(txt.encode()))) != txt:
        raise Invariant(f"accepted TXT does not round-trip: {txt!r}")
    return txt


def service_target(data: bytes) -> str:
    """TXT + address strings (split at the first 0x00) through the whole core: it
    must never raise, whatever the network says."""
    text, _, rest = data.partition(b"\x00")
    addrs = tuple(rest.decode("utf-8", "replace").split("\x01"))
    core = DiscoveryCore(b"\x00" * 32, max_instances=2)
    events = core.resolved(ResolvedService("a." + SERVICE_TYPE, text, addrs), 1.0)
    events += core.removed("A." + SERVICE_TYPE, 2.0)
    if len(events) not in (0, 2) or core.peers():
        raise Invariant(f"seen+goodbye left {events!r} / {core.peers()!r}")
    return "peer" if events else "ignored"


def _service_seeds() -> list[bytes]:
    addrs = "\x01".join(["10.0.0.1", "fe80::1%2", "2001:db8::1", "fe80::2", "::ffff:10.0.0.2"])
    return [t + b"\x00" + addrs.encode() for t in _txt_seeds()]


def static_peer_target(data: bytes) -> StaticPeer:
    peer = parse_static_peer(data.decode("utf-8", "replace"))
    if parse_static_peer(str(peer)) != peer:
        raise Invariant(f"accepted entry does not round-trip: {peer}")
    if peer.scope is not None and not all(c.isalnum() or c in "_.-@" for c in peer.scope):
        raise Invariant(f"interface name no kernel accepts: {peer.scope!r}")
    return peer


def _static_seeds() -> list[bytes]:
    return [
        e.encode()
        for e in (
            f"10.0.0.1:4201#{FPR}",
            f"[fe80::1%mesh0]:4202#{FPR}",
            f"[2001:db8::1]#{FPR}",
            f"router.ffxyz.net:4300#{FPR}",
            f"10.0.0.1:4201#{FPR[:10]}",
        )
    ]


pure("mesh.mdns_txt", seeds=_txt_seeds, target=txt_target, allowed=(BadTxtRecord,))
pure("mesh.mdns_service", seeds=_service_seeds, target=service_target, allowed=())
pure("mesh.static_peer", seeds=_static_seeds, target=static_peer_target, allowed=(ConfigError,))

"""Mesh routing wire records and their signatures (sans-IO).

What travels on a federation link (:class:`RouteUpdate`: route announcements,
home bindings, seq requests), how each record is checked for shape, and exactly
which bytes an origin node or a user's client signs. Kept apart from the route
table (:mod:`.routing`) and the binding store (:mod:`.bindings`) so the wire
format and its golden fixtures have one home, and a parser can be fuzzed alone.

**Signed bytes** are a fixed-width encoding with a domain-separation prefix, never
protobuf bytes (see :func:`route_signed_bytes`, :func:`binding_signed_bytes`).
Signature checks go through injected ``verify(public_key, message, signature) ->
bool`` callables (a node's key signs raw Ed25519; a user's client signs through
``Identity.sign``, which prefixes its own context, so the node passes a matching
verify), and results are cached (:class:`VerifyCache`, bounded) because the same
announcement arrives from every neighbour, every interval.
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import msgspec
from google.protobuf.message import DecodeError

from qpc_node.errors import LocalProtocolError, RemoteProtocolError
from qpc_node.wire.gen.qpc.v1 import mesh_pb2

ROUTE_DOMAIN = b"qpc-mesh-route-v1\x00"
HOME_DOMAIN = b"qpc-mesh-home-v1\x00"
ID_LEN = 32
KEY_LEN = 32
SIG_LEN = 64
INFINITY = 0xFFFF
"""``hops`` of a retraction: the sender has no route to the origin any more."""
MAX_U64 = (1 << 64) - 1
MAX_UPDATE_BYTES = 256 * 1024
MAX_UPDATE_ENTRIES = 2048
"""Decoder caps: a batch is at most ``max_batch_entries`` (default 128) entries."""

Verify = Callable[[bytes, bytes, bytes], bool]
"""``verify(public_key, message, signature)``: True iff the signature is valid."""
Sign = Callable[[bytes], bytes]


def node_id_of(public_key: bytes) -> bytes:
    """Node id (and user fingerprint): SHA-256 of the raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_key).digest()


def route_signed_bytes(origin: bytes, origin_key: bytes, seq: int, expiry_ms: int) -> bytes:
    """Exactly what an origin signs: prefix || origin || key || seq (u64 BE) || expiry (u64 BE)."""
    return (
        ROUTE_DOMAIN + origin + origin_key + seq.to_bytes(8, "big") + expiry_ms.to_bytes(8, "big")
    )


def binding_signed_bytes(
    user: bytes, user_key: bytes, node: bytes, seq: int, expiry_ms: int
) -> bytes:
    """Exactly what a user's client signs for a home binding (same layout rules)."""
    return (
        HOME_DOMAIN + user + user_key + node + seq.to_bytes(8, "big") + expiry_ms.to_bytes(8, "big")
    )


# -- wire records ---------------------------------------------------------------------------


def _check_len(
    err: type[LocalProtocolError | RemoteProtocolError], what: str, v: bytes, n: int
) -> None:
    if len(v) != n:
        raise err(f"{what} must be {n} bytes, got {len(v)}")


class Announcement(msgspec.Struct, frozen=True):
    """A node route as it travels one link: origin-signed fields plus the sender's ``hops``."""

    origin: bytes
    origin_key: bytes
    seq: int
    expiry_ms: int
    signature: bytes
    hops: int

    def validate(self, *, remote: bool) -> None:
        """Shape only (lengths, ranges); signatures and ids are the router's job."""
        err = RemoteProtocolError if remote else LocalProtocolError
        _check_len(err, "route origin", self.origin, ID_LEN)
        _check_len(err, "route origin_key", self.origin_key, KEY_LEN)
        _check_len(err, "route signature", self.signature, SIG_LEN)
        if not 0 < self.seq <= MAX_U64:
            raise err("route seq must be in 1..2^64-1")
        if not 0 < self.expiry_ms <= MAX_U64:
            raise err("route expiry_ms must be set")
        if not 0 <= self.hops <= INFINITY:
            raise err(f"route hops must be in 0..{INFINITY}")

    def signed_bytes(self) -> bytes:
        return route_signed_bytes(self.origin, self.origin_key, self.seq, self.expiry_ms)

    @property
    def retraction(self) -> bool:
        return self.hops == INFINITY

    def to_proto(self) -> mesh_pb2.RouteAnnouncement:
        return mesh_pb2.RouteAnnouncement(
            origin=self.origin,
            origin_key=self.origin_key,
            seq=self.seq,
            expiry_ms=self.expiry_ms,
            signature=self.signature,
            hops=self.hops,
        )

    @classmethod
    def from_proto(cls, pb: mesh_pb2.RouteAnnouncement) -> Announcement:
        a = cls(pb.origin, pb.origin_key, pb.seq, pb.expiry_ms, pb.signature, pb.hops)
        a.validate(remote=True)
        return a

    def encode(self) -> bytes:
        self.validate(remote=False)
        return self.to_proto().SerializeToString(deterministic=True)

    @classmethod
    def decode(cls, data: bytes) -> Announcement:
        return cls.from_proto(_parse(mesh_pb2.RouteAnnouncement(), data, "route announcement"))


class HomeBinding(msgspec.Struct, frozen=True):
    """ "User ``user`` is homed on node ``node``", signed by the user's client."""

    user: bytes
    user_key: bytes
    node: bytes
    seq: int
    expiry_ms: int
    signature: bytes

    def validate(self, *, remote: bool) -> None:
        err = RemoteProtocolError if remote else LocalProtocolError
        _check_len(err, "binding user", self.user, ID_LEN)
        _check_len(err, "binding user_key", self.user_key, KEY_LEN)
        _check_len(err, "binding node", self.node, ID_LEN)
        _check_len(err, "binding signature", self.signature, SIG_LEN)
        if not 0 < self.seq <= MAX_U64:
            raise err("binding seq must be in 1..2^64-1")
        if not 0 < self.expiry_ms <= MAX_U64:
            raise err("binding expiry_ms must be set")

    def signed_bytes(self) -> bytes:
        return binding_signed_bytes(self.user, self.user_key, self.node, self.seq, self.expiry_ms)

    def to_proto(self) -> mesh_pb2.HomeBinding:
        return mesh_pb2.HomeBinding(
            user=self.user,
            user_key=self.user_key,
            node=self.node,
            seq=self.seq,
            expiry_ms=self.expiry_ms,
            signature=self.signature,
        )

    @classmethod
    def from_proto(cls, pb: mesh_pb2.HomeBinding) -> HomeBinding:
        b = cls(pb.user, pb.user_key, pb.node, pb.seq, pb.expiry_ms, pb.signature)
        b.validate(remote=True)
        return b

    def encode(self) -> bytes:
        self.validate(remote=False)
        return self.to_proto().SerializeToString(deterministic=True)

    @classmethod
    def decode(cls, data: bytes) -> HomeBinding:
        return cls.from_proto(_parse(mesh_pb2.HomeBinding(), data, "home binding"))


class SeqRequest(msgspec.Struct, frozen=True):
    """ "Announce ``origin`` with a seq >= ``seq``", forwarded at most ``hop_limit`` hops."""

    origin: bytes
    seq: int
    hop_limit: int

    def validate(self, *, remote: bool) -> None:
        err = RemoteProtocolError if remote else LocalProtocolError
        _check_len(err, "seq request origin", self.origin, ID_LEN)
        if not 0 < self.seq <= MAX_U64:
            raise err("seq request seq must be in 1..2^64-1")
        if not 0 < self.hop_limit <= 255:
            raise err("seq request hop_limit must be in 1..255")

    def to_proto(self) -> mesh_pb2.SeqRequest:
        return mesh_pb2.SeqRequest(origin=self.origin, seq=self.seq, hop_limit=self.hop_limit)

    @classmethod
    def from_proto(cls, pb: mesh_pb2.SeqRequest) -> SeqRequest:
        r = cls(pb.origin, pb.seq, pb.hop_limit)
        r.validate(remote=True)
        return r


class RouteUpdate(msgspec.Struct, frozen=True):
    """One batch on a link."""

    routes: tuple[Announcement, ...] = ()
    bindings: tuple[HomeBinding, ...] = ()
    requests: tuple[SeqRequest, ...] = ()

    def __len__(self) -> int:
        return len(self.routes) + len(self.bindings) + len(self.requests)

    def encode(self) -> bytes:
        if len(self) > MAX_UPDATE_ENTRIES:
            raise LocalProtocolError(f"route update of {len(self)} entries")
        for a in self.routes:
            a.validate(remote=False)
        for b in self.bindings:
            b.validate(remote=False)
        for r in self.requests:
            r.validate(remote=False)
        pb = mesh_pb2.RouteUpdate(
            routes=[a.to_proto() for a in self.routes],
            bindings=[b.to_proto() for b in self.bindings],
            requests=[r.to_proto() for r in self.requests],
        )
        data = pb.SerializeToString(deterministic=True)
        if len(data) > MAX_UPDATE_BYTES:
            raise LocalProtocolError(f"route update of {len(data)} bytes")
        return data

    @classmethod
    def decode(cls, data: bytes) -> RouteUpdate:
        """Parse a neighbour's batch; any defect is a RemoteProtocolError (nothing applied)."""
        if len(data) > MAX_UPDATE_BYTES:
            raise RemoteProtocolError(f"route update of {len(data)} bytes")
        pb = _parse(mesh_pb2.RouteUpdate(), data, "route update")
        n = len(pb.routes) + len(pb.bindings) + len(pb.requests)
        if n > MAX_UPDATE_ENTRIES:
            raise RemoteProtocolError(f"route update of {n} entries")
        return cls(
            tuple(Announcement.from_proto(a) for a in pb.routes),
            tuple(HomeBinding.from_proto(b) for b in pb.bindings),
            tuple(SeqRequest.from_proto(r) for r in pb.requests),
        )


_M = TypeVar("_M", mesh_pb2.RouteAnnouncement, mesh_pb2.HomeBinding, mesh_pb2.RouteUpdate)


def _parse(pb: _M, data: bytes, what: str) -> _M:
    if len(data) > MAX_UPDATE_BYTES:
        raise RemoteProtocolError(f"{what} of {len(data)} bytes")
    try:
        pb.ParseFromString(data)
    except DecodeError as exc:
        raise RemoteProtocolError(f"malformed {what}: {exc}") from None
    return pb


def sign_announcement(
    public_key: bytes, sign: Sign, seq: int, expiry_ms: int, hops: int = 0
) -> Announcement:
    """A node's own announcement (``sign`` = its node key's raw Ed25519 signature)."""
    origin = node_id_of(public_key)
    sig = sign(route_signed_bytes(origin, public_key, seq, expiry_ms))
    a = Announcement(origin, public_key, seq, expiry_ms, sig, hops)
    a.validate(remote=False)
    return a


def sign_binding(user_key: bytes, sign: Sign, node: bytes, seq: int, expiry_ms: int) -> HomeBinding:
    """A client's home binding (``sign`` = the user identity's signing function)."""
    user = node_id_of(user_key)
    sig = sign(binding_signed_bytes(user, user_key, node, seq, expiry_ms))
    b = HomeBinding(user, user_key, node, seq, expiry_ms, sig)
    b.validate(remote=False)
    return b


class VerifyCache:
    """Signatures already verified, bounded (LRU): a periodic dump repeats the same
    signed bytes from every neighbour, and each is verified once, not every time."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self.verified = 0
        """Signatures checked with ``verify`` (cache misses)."""
        self.hits = 0

    def check(self, verify: Verify, key: bytes, msg: bytes, sig: bytes) -> bool:
        """``verify(key, msg, sig)``, unless this exact ``msg`` and ``sig`` passed before."""
        cache_key = msg + sig
        if cache_key in self._seen:
            self._seen.move_to_end(cache_key)
            self.hits += 1
            return True
        self.verified += 1
        if not verify(key, msg, sig):
            return False
        self._seen[cache_key] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return True


class Outcome(enum.Enum):
    """What the router did with one received announcement or binding."""

    ACCEPTED = "accepted"
    REFRESHED = "refreshed"
    """The same signed content again: timers renewed, nothing re-verified or re-sent."""
    RETRACTED = "retracted"
    FORGED = "forged"
    """Bad signature, id != SHA-256(key), or a neighbour claiming to be the origin."""
    EXPIRED = "expired"
    FUTURE = "future"
    """Expiry further ahead than any honest signer sets it (lifetime + clock skew)."""
    REPLAYED = "replayed"
    """Older than what we hold (lower seq, or an equal seq that loses the tie)."""
    OWN = "own"
    UNREACHABLE = "unreachable"
    """Beyond ``max_hops``: treated as a retraction from that neighbour."""
    FULL = "full"
    FOREIGN = "foreign"
    """A binding handed to :meth:`.routing.Router.home` that names another node."""
    NO_LINK = "no link"

"""Plumtree frames on the wire (proto/qpc/v1/gossip.proto) and back.

Decoding is where a neighbour's bytes first meet this node: the size of the call and
the counts inside it are checked before anything is built, a call protobuf cannot parse
is one typed error (:class:`GossipMalformed`), and within a well-formed call every frame
that breaks a rule (an id that is not 16 bytes, a hop count out of range, too many ids)
is dropped and counted by reason while the rest are used: one bad frame from a newer or
buggy peer does not cost the good ones next to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from google.protobuf.message import DecodeError

from qpc_node.errors import RemoteProtocolError
from qpc_node.storefwd.core import MSG_ID_LEN, Ack, Frame, Graft, IHave, Prune, Push
from qpc_node.wire.gen.qpc.v1 import gossip_pb2

__all__ = [
    "DROP_REASONS",
    "Decoded",
    "GossipMalformed",
    "GossipWireLimits",
    "decode_request",
    "encode_request",
]

DROP_REASONS = ("bad_id", "bad_hops", "too_many_ids", "too_large", "empty")
"""Why a frame inside a well-formed call was dropped (counted per reason)."""


class GossipMalformed(RemoteProtocolError):
    """A Gossip call that cannot be read at all (not protobuf, too big, too many frames)."""


class GossipWireLimits(msgspec.Struct, frozen=True):
    max_request_bytes: int = 256 * 1024
    max_frames: int = 256
    max_ids: int = 512
    """Ids in one IHAVE/GRAFT/ACK frame."""
    max_payload: int = 64 * 1024
    max_hops: int = 255


class Decoded(msgspec.Struct):
    frames: list[Frame] = msgspec.field(default_factory=list)
    dropped: dict[str, int] = msgspec.field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def _ids_ok(ids: Sequence[bytes], lim: GossipWireLimits, out: Decoded) -> bool:
    if len(ids) > lim.max_ids:
        out.drop("too_many_ids")
        return False
    if any(len(m) != MSG_ID_LEN for m in ids):
        out.drop("bad_id")
        return False
    return True


def decode_request(data: bytes, limits: GossipWireLimits | None = None) -> Decoded:
    """The frames of one GossipRequest; raises :class:`GossipMalformed` only when the
    call as a whole is unreadable (see the module docstring)."""
    lim = limits or GossipWireLimits()
    if len(data) > lim.max_request_bytes:
        raise GossipMalformed(f"gossip call of {len(data)} bytes exceeds {lim.max_request_bytes}")
    req = gossip_pb2.GossipRequest()
    try:
        req.ParseFromString(data)
    except DecodeError as exc:
        raise GossipMalformed(f"malformed gossip call: {exc}") from None
    return decode_frames(req, lim)


def decode_frames(req: gossip_pb2.GossipRequest, limits: GossipWireLimits | None = None) -> Decoded:
    """As :func:`decode_request`, for a request the RPC layer already parsed."""
    lim = limits or GossipWireLimits()
    if len(req.frames) > lim.max_frames:
        raise GossipMalformed(f"gossip call of {len(req.frames)} frames exceeds {lim.max_frames}")
    out = Decoded()
    for f in req.frames:
        kind = f.WhichOneof("kind")
        if kind == "push":
            p = f.push
            if len(p.msg_id) != MSG_ID_LEN:
                out.drop("bad_id")
            elif not 0 < p.hops <= lim.max_hops:
                out.drop("bad_hops")
            elif len(p.payload) > lim.max_payload:
                out.drop("too_large")
            else:
                out.frames.append(Push(bytes(p.msg_id), p.hops, bytes(p.payload)))
        elif kind == "ihave":
            ents = f.ihave.entries
            if len(ents) > lim.max_ids:
                out.drop("too_many_ids")
            elif any(len(e.msg_id) != MSG_ID_LEN for e in ents):
                out.drop("bad_id")
            elif any(e.hops > lim.max_hops for e in ents):
                out.drop("bad_hops")
            else:
                out.frames.append(IHave(tuple((bytes(e.msg_id), e.hops) for e in ents)))
        elif kind == "graft":
            ids = f.graft.msg_ids
            if _ids_ok(ids, lim, out):
                out.frames.append(Graft(tuple(bytes(m) for m in ids)))
        elif kind == "ack":
            ids = f.ack.msg_ids
            if not ids:
                out.drop("empty")
            elif _ids_ok(ids, lim, out):
                out.frames.append(Ack(tuple(bytes(m) for m in ids)))
        elif kind == "prune":
            out.frames.append(Prune())
        else:  # a kind this build does not know (a newer peer), or none set
            out.drop("empty")
    return out


def to_proto(frames: Sequence[Frame]) -> gossip_pb2.GossipRequest:
    req = gossip_pb2.GossipRequest()
    for f in frames:
        g = req.frames.add()
        if isinstance(f, Push):
            g.push.msg_id = f.msg_id
            g.push.hops = f.hops
            g.push.payload = f.payload
        elif isinstance(f, IHave):
            g.ihave.SetInParent()
            for mid, hops in f.entries:
                g.ihave.entries.add(msg_id=mid, hops=hops)
        elif isinstance(f, Graft):
            g.graft.SetInParent()
            g.graft.msg_ids.extend(f.msg_ids)
        elif isinstance(f, Ack):
            g.ack.SetInParent()
            g.ack.msg_ids.extend(f.msg_ids)
        elif isinstance(f, Prune):
            g.prune.SetInParent()
        else:
            raise TypeError(f"not a gossip frame: {f!r}")
    return req


def encode_request(frames: Sequence[Frame]) -> bytes:
    """One GossipRequest carrying ``frames`` in order."""
    return to_proto(frames).SerializeToString(deterministic=True)

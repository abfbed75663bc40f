"""Gossip (Plumtree) frames from a neighbour: the wire decoder, then the core.

The decoded frames go into a real PlumtreeCore (one per run, so state accumulates
across inputs as it would from a hostile neighbour): whatever they hold, the core
must neither raise nor grow past its bounds, and what decoded must re-encode to
frames that decode the same.
"""

from __future__ import annotations

from pathlib import Path

from qpc_node.storefwd.core import Ack, Graft, IHave, Prune, Push
from qpc_node.storefwd.gossip_wire import (
    GossipMalformed,
    GossipWireLimits,
    decode_request,
    encode_request,
)
from qpc_node.storefwd.plumtree import PlumtreeCore, PlumtreePolicy
from tests.fuzz.registry import Invariant, pure

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "gossip"
LIMITS = GossipWireLimits(max_request_bytes=64 * 1024, max_frames=64, max_ids=64)
POLICY = PlumtreePolicy(max_missing=256, max_unacked=64, max_queued=256, cache_entries=256)
PEER = b"\x42" * 32
_state: dict[str, object] = {}


def _seeds() -> list[bytes]:
    seeds = [bytes.fromhex(p.read_text().strip()) for p in sorted(FIXTURES.glob("msg_*.hex"))]
    ids = tuple(bytes([i]) * 16 for i in range(8))
    seeds.append(
        encode_request(
            [
                Push(ids[0], 1, b"payload"),
                IHave(tuple((m, 2) for m in ids)),
                Graft(ids[:3]),
                Graft(()),
                Prune(),
                Ack(ids[3:]),
            ]
        )
    )
    seeds.append(encode_request([Push(m, 3, m * 4) for m in ids]))
    return seeds


def _core() -> tuple[PlumtreeCore, list[float]]:
    core = _state.get("core")
    if not isinstance(core, PlumtreeCore):
        core = PlumtreeCore(POLICY)
        core.link_up(0.0, PEER)
        core.link_up(0.0, b"\x43" * 32)
        _state["core"] = core
        _state["now"] = [0.0]
    now = _state["now"]
    assert isinstance(now, list)
    return core, now


def gossip_target(data: bytes) -> str:
    dec = decode_request(data, LIMITS)
    again = decode_request(encode_request(dec.frames), LIMITS)
    if again.frames != dec.frames or again.dropped:
        raise Invariant("decoded frames do not re-encode to the same frames")
    core, now = _core()
    now[0] += 0.07
    core.receive(now[0], PEER, dec.frames)
    core.tick(now[0])
    core.poll()
    st = core.statistics()
    if st.missing > POLICY.max_missing or st.cache_entries > POLICY.cache_entries:
        raise Invariant(f"core past its bounds: {st}")
    if st.unacked > 2 * POLICY.max_unacked:
        raise Invariant(f"unacked pushes past their bound: {st.unacked}")
    return f"frames={min(len(dec.frames), 3)} dropped={min(sum(dec.dropped.values()), 2)}"


pure("gossip.frames", seeds=_seeds, target=gossip_target, allowed=(GossipMalformed,))

"""The one protocol every broadcast core speaks: ours (Plumtree), and the baselines the
simulator compares it with (flooding, gossipsub-like).

A core is sans-IO: the caller feeds it events with the time (`now`, seconds as a float,
monotonic or virtual) and drains what it wants done with `poll()`. The Trio driver
(`storefwd/gossip.py`) and the discrete-event simulator (`qpc_sim`) are the two callers;
keeping the seam this narrow is what lets one run compare all three protocols on the same
losses.

msg_id is 16 bytes; payloads are opaque to the core (the driver validates them, checks hop
limit and expiry, since only it knows the ChannelMessage inside).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import msgspec

MSG_ID_LEN = 16


@runtime_checkable
class Frame(Protocol):
    """One unit a core sends to a neighbour; frames are frozen records (msgspec Structs)."""

    @property
    def is_payload(self) -> bool:
        """True when it carries a message body (counts as a transmission)."""
        ...

    def wire_size(self) -> int:
        """Bytes on the wire (approximate is fine for control frames)."""
        ...


class Send(msgspec.Struct, frozen=True):
    """Send `frames` to `peer`, in this order, as one datagram/call if the driver can."""

    peer: bytes
    frames: tuple[Frame, ...]


class Deliver(msgspec.Struct, frozen=True):
    """First reception of `msg_id` at this node (or a local publish).

    `peer` is the neighbour it came from (None for a local publish); `hops` the hop count
    it travelled (0 for a local publish).
    """

    msg_id: bytes
    payload: bytes
    hops: int
    peer: bytes | None


class GossipCore(Protocol):
    """What the driver and the simulator call; every protocol implements it."""

    def link_up(self, now: float, peer: bytes) -> None:
        """`peer` became a one-hop neighbour (or came back)."""
        ...

    def link_down(self, now: float, peer: bytes) -> None:
        """`peer` is no longer reachable; forget per-link state for it."""
        ...

    def publish(self, now: float, msg_id: bytes, payload: bytes) -> None:
        """A local message: delivered here too (a Deliver with peer None), then spread."""
        ...

    def receive(self, now: float, peer: bytes, frames: Sequence[Frame]) -> None:
        """Frames that arrived from `peer` (already validated by the driver)."""
        ...

    def tick(self, now: float) -> None:
        """Run every timer due at `now`."""
        ...

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (None: nothing pending)."""
        ...

    def poll(self) -> list[Send | Deliver]:
        """Drain the outputs, in the order they were produced."""
        ...

    def holding(self) -> Iterable[tuple[bytes, bytes]]:
        """(msg_id, payload) pairs it can still serve (for anti-entropy sync)."""
        ...


# -- the frames of our protocol (Plumtree) ------------------------------------------------
# They live here, not in plumtree.py, because the simulator builds Push frames itself (it
# models anti-entropy sync by handing a core the Pushes reconciliation found missing) and
# the driver maps them to and from protobuf. Sizes approximate the protobuf encoding
# (tag + length prefixes), which is all the simulator's byte counts need.


class Push(msgspec.Struct, frozen=True):
    """A message body, eager on a tree edge or in answer to a GRAFT."""

    msg_id: bytes
    hops: int
    payload: bytes

    @property
    def is_payload(self) -> bool:
        return True

    def wire_size(self) -> int:
        return 2 + MSG_ID_LEN + 3 + 4 + len(self.payload)


class IHave(msgspec.Struct, frozen=True):
    """Lazy announcements: (msg_id, hops) this node holds, for the non-eager neighbours."""

    entries: tuple[tuple[bytes, int], ...]

    @property
    def is_payload(self) -> bool:
        return False

    def wire_size(self) -> int:
        return 4 + (2 + 2 + MSG_ID_LEN + 3) * len(self.entries)


class Graft(msgspec.Struct, frozen=True):
    """Make the edge eager again and send these ids (repair a missing message)."""

    msg_ids: tuple[bytes, ...]

    @property
    def is_payload(self) -> bool:
        return False

    def wire_size(self) -> int:
        return 4 + (2 + MSG_ID_LEN) * len(self.msg_ids)


class Prune(msgspec.Struct, frozen=True):
    """Stop eager pushes on this edge (it delivered a duplicate); IHAVE continues."""

    @property
    def is_payload(self) -> bool:
        return False

    def wire_size(self) -> int:
        return 2


class Ack(msgspec.Struct, frozen=True):
    """Per-hop acknowledgement of eager pushes (batched), so the sender stops retransmitting."""

    msg_ids: tuple[bytes, ...]

    @property
    def is_payload(self) -> bool:
        return False

    def wire_size(self) -> int:
        return 4 + (2 + MSG_ID_LEN) * len(self.msg_ids)


PlumtreeFrame = Push | IHave | Graft | Prune | Ack

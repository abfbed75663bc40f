"""One local user's relayed mail has a share of the custody queue: a flood of DMs to
remote users leaves room for every other local user's (store/federation.py)."""

from __future__ import annotations

import os
from pathlib import Path

from qpc_node.store import Envelope, Store
from qpc_node.store.federation import RelayItem, RelayQueueLimits, relay_accept

NOW = 1_800_000_000_000
HERE, HOP, OTHER_HOP = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32
FLOODER = b"\x01" * 32


def item(origin: bytes | None, *, hop: bytes = HOP, source: bytes = HERE) -> RelayItem:
    env = Envelope(os.urandom(16), os.urandom(32), NOW + 3_600_000, 8, b"x" * 32)
    return RelayItem(hop, source, env, origin)


def test_one_local_user_flooding_leaves_room_for_the_others(tmp_path: Path) -> None:
    limits = RelayQueueLimits()  # the defaults a node runs with
    with Store.open(tmp_path / "node.db") as s:
        flood = relay_accept(
            s, [item(FLOODER) for _ in range(limits.max_per_source)], NOW, limits, proven=True
        )
        assert flood.count("queued") == limits.max_per_origin < limits.max_per_source
        assert set(flood[limits.max_per_origin :]) == {"origin_full"}
        # Another local user's DM to a remote user is still taken into custody.
        others = [item(os.urandom(32), hop=OTHER_HOP) for _ in range(3)]
        assert relay_accept(s, others, NOW, limits, proven=True) == ["queued"] * 3


def test_the_share_is_per_source_and_unknown_origins_only_face_the_source_limit(
    tmp_path: Path,
) -> None:
    limits = RelayQueueLimits(max_per_source=6, max_per_origin=2)
    with Store.open(tmp_path / "node.db") as s:
        neighbour = b"\xdd" * 32
        got = relay_accept(s, [item(FLOODER) for _ in range(3)], NOW, limits, proven=True)
        assert got == ["queued", "queued", "origin_full"]
        # The same origin declared by a neighbour is another sender key.
        got = relay_accept(s, [item(FLOODER, source=neighbour) for _ in range(2)], NOW, limits)
        assert got == ["queued", "queued"]
        none = [item(None, source=neighbour) for _ in range(5)]
        assert relay_accept(s, none, NOW, limits) == ["queued"] * 4 + ["source_full"]

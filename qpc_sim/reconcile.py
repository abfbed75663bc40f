"""Reconciliation cost: the real negentropy protocol (through `qpc_node._core`) or a full list.

Our message ids are 16 bytes; negentropy's are 32, so an id is padded with 16 zero bytes
(reversible, and padding costs nothing in the fingerprints). Timestamps are the
messages' publish times in ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def negentropy_class() -> Any:
    """`qpc_node._core.Negentropy` when the extension has it, else None."""
    try:
        from qpc_node import _core
    except ImportError:
        return None
    return getattr(_core, "Negentropy", None)


def pad(msg_id: bytes) -> bytes:
    return msg_id + bytes(32 - len(msg_id))


class NegentropyReconciler:
    """Runs a real negentropy session between the two sets and counts its bytes and rounds."""

    name = "negentropy"

    def __init__(self, frame_size_limit: int = 0) -> None:
        cls = negentropy_class()
        if cls is None:
            raise RuntimeError("qpc_node._core has no Negentropy (the sync branch is not merged)")
        self._cls = cls
        self.frame_size_limit = frame_size_limit

    def session(
        self, ours: Sequence[tuple[int, bytes]], theirs: Sequence[tuple[int, bytes]]
    ) -> tuple[int, int, set[bytes], set[bytes]]:
        """(bytes both ways, round trips, ids we lack, ids they lack) for (timestamp, id) items."""
        init = self._cls([(t, pad(i)) for t, i in ours], self.frame_size_limit)
        resp = self._cls([(t, pad(i)) for t, i in theirs], self.frame_size_limit)
        msg: bytes | None = init.initiate()
        total = 0
        rounds = 0
        need: set[bytes] = set()
        have: set[bytes] = set()
        while msg is not None:
            total += len(msg)
            reply = resp.reconcile(msg)
            total += len(reply)
            rounds += 1
            msg, has_ids, need_ids = init.reconcile_with_ids(reply)
            have.update(bytes(x)[:16] for x in has_ids)
            need.update(bytes(x)[:16] for x in need_ids)
            if rounds > 64:
                raise RuntimeError("negentropy did not converge in 64 rounds")
        return total, rounds, need, have

    def cost(
        self, ours: Sequence[tuple[int, bytes]], theirs: Sequence[tuple[int, bytes]]
    ) -> tuple[int, int]:
        total, rounds, _, _ = self.session(ours, theirs)
        return total, rounds


def full_list_bytes(ours: Sequence[bytes], theirs: Sequence[bytes]) -> int:
    """Sending our whole id list (16 B + 2 B framing each) and getting back the ids we lack."""
    have = set(ours)
    return 4 + 18 * len(ours) + 4 + 18 * sum(1 for i in theirs if i not in have)

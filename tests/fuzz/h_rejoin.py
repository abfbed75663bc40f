"""Rejoin offers (qpc_node/groups/rejoin.py): the BranchOffer a member of another branch
sends in a Sealed.REJOIN_OFFER. Any bytes give an Opened, None or InvalidOffer; an offer
that opens names a shared epoch and a roster of whole fingerprints."""

from __future__ import annotations

from qpc_node.groups.fork import OrderKey
from qpc_node.groups.rejoin import InvalidOffer, Step, open_offer, seal_offer
from tests.fuzz.registry import Invariant, pure

GID = bytes(range(16))
TAGS = [bytes([k]) * 16 for k in range(1, 5)]
KEYS = {t: bytes([k + 100]) * 32 for k, t in enumerate(TAGS)}
"""The receiver shares the first three epochs with the sender's branch."""
RECEIVER = {t: KEYS[t] for t in TAGS[:3]}


def _steps(n: int) -> list[Step]:
    key = OrderKey(1, b"\x05" * 32, b"\x06" * 32)
    return [Step(t, KEYS[t], key if k < n - 1 else None) for k, t in enumerate(TAGS[:n])]


def _seeds() -> list[bytes]:
    counter = iter(range(1 << 20))

    def rand(n: int) -> bytes:
        return bytes([next(counter) % 256]) * n

    return [
        seal_offer(GID, _steps(n), ["ab" * 32] * k, b"group-info" * k, rand)
        for n, k in ((1, 0), (2, 1), (4, 3))
    ]


def open_target(data: bytes) -> str:
    opened = open_offer(GID, data, RECEIVER)
    if opened is None:
        return "none"
    if opened.fork_tag not in RECEIVER or any(len(m) != 64 for m in opened.roster):
        raise Invariant(f"offer opened wrongly: {opened}")
    return "opened"


pure("groups.branch_offer", seeds=_seeds, target=open_target, allowed=(InvalidOffer,))

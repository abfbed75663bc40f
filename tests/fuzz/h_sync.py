"""Inventory sync: the negentropy binding in both roles (and, with sync.proto, its frames).

Seeds are real session messages (a first query, a reply, a later query) over a few
hundred items, so mutants stay close to valid ranges, fingerprints and id lists.
"""

from __future__ import annotations

import hashlib

from qpc_node._core import Negentropy, SyncError
from tests.fuzz.registry import Invariant, pure

LIMIT = 4096


def _items(n: int, salt: int) -> list[tuple[int, bytes]]:
    return [(i // 4, hashlib.sha256(b"fz-sync-%d-%d" % (salt, i)).digest()) for i in range(n)]


MINE = _items(300, 0)
THEIRS = _items(200, 0) + _items(120, 1)


def _negentropy_seeds() -> list[bytes]:
    init = Negentropy(MINE, LIMIT)
    resp = Negentropy(THEIRS, LIMIT)
    q1 = init.initiate()
    r1 = resp.reconcile(q1)
    q2, _, _ = init.reconcile_with_ids(r1)
    seeds = [q1, r1, b"\x61", b"\x60", b"\x61\x00\x00"]
    if q2 is not None:
        seeds += [q2, resp.reconcile(q2)]
    return seeds


def _responder(data: bytes) -> None:
    out = Negentropy(THEIRS, LIMIT).reconcile(data)
    if len(out) > LIMIT or out[:1] != b"\x61":
        raise Invariant(f"responder answer of {len(out)} bytes starting {out[:1]!r}")


def _initiator(data: bytes) -> None:
    init = Negentropy(MINE, LIMIT)
    init.initiate()
    nxt, have, need = init.reconcile_with_ids(data)
    if nxt is not None and len(nxt) > LIMIT:
        raise Invariant(f"next query of {len(nxt)} bytes")
    if any(len(i) != 32 for i in have + need):
        raise Invariant("id of wrong length")
    # `need` may name ids we hold: a peer can list any id in any range (ids are
    # compared within a timestamp range), so the session core filters it; `have`
    # comes from our own storage and must be ours.
    if not set(have) <= {i for _, i in MINE}:
        raise Invariant("have names an id we do not hold")


pure("sync.negentropy.responder", seeds=_negentropy_seeds, target=_responder, allowed=(SyncError,))
pure("sync.negentropy.initiator", seeds=_negentropy_seeds, target=_initiator, allowed=(SyncError,))

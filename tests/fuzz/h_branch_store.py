"""The client's persisted branch record (qpc_node/client/branch_store.py ``decode``).

client.db keeps it per group so a switch interrupted by a crash recovers; a corrupt or
hostile record must give BranchStateError (the client drops it), never another
exception, and what decodes must encode and decode again to the same record.
"""

from __future__ import annotations

import hashlib

from qpc_node.client.branch_store import (
    BranchState,
    BranchStateError,
    PastEpoch,
    decode,
    encode,
)
from qpc_node.groups.fork import EpochInfo, ForkCommit, ForkResolver, OrderKey
from tests.fuzz.registry import Invariant, pure


def _tag(seed: bytes) -> bytes:
    return hashlib.sha256(b"tag" + seed).digest()[:16]


def _info(tag: bytes, n: int) -> EpochInfo:
    return EpochInfo(tag, n, hashlib.sha256(tag).digest(), frozenset({"a", "b", "c"}))


def _seeds() -> list[bytes]:
    r = ForkResolver(window=3, retain_ms=1_000)
    root = _info(_tag(b"root"), 0)
    r.start(root, 0)
    out = [encode(BranchState(r))]
    parent, tags = root, [root.tag]
    for k in range(3):
        c = ForkCommit(parent.tag, b"commit-%d" % k, k, k == 0, removed=("c",) if k else ())
        child = _info(_tag(c.commit), k + 1)
        r.entered(c, child, k + 1, 10 * k)
        r.note_sent(child.tag, b"app-%d" % k)
        parent = child
        tags.append(child.tag)
    out.append(encode(BranchState(r, {"c"}, {tags[1]: [b"p1", b"p2"]}, b"commit")))
    # Record version 2: the rejoin history and what is left to ask for again.
    roster = frozenset({"a", "b"})
    past = [
        PastEpoch(t, k, bytes([k]) * 32, roster, OrderKey(k % 2, b"r" * 32, b"d" * 32), ("e",))
        for k, t in enumerate(tags)
    ]
    past[-1].child = None
    past[-1].sent = [b"app-2"]
    out.append(
        encode(
            BranchState(
                r,
                own_added={"e"},
                past=past,
                readd={"e"},
                rejoin_removed={"c"},
                offered=(tags[-1], 7, 1),
            )
        )
    )
    return out


def decode_target(data: bytes) -> None:
    state = decode(data)
    again = encode(decode(encode(state)))
    if again != encode(state):
        raise Invariant("encode/decode is not stable")


pure("client.branch_record", seeds=_seeds, target=decode_target, allowed=(BranchStateError,))

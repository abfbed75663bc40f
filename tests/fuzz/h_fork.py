"""The fork resolver's stored state (qpc_node/groups/fork.py ``ForkResolver.load``).

The client stores it with the group and loads it after a restart; a corrupt or hostile
file must give ForkError, never another exception, and what loads must dump and load
again to the same state.
"""

from __future__ import annotations

import hashlib

from qpc_node.groups.fork import EpochInfo, ForkCommit, ForkError, ForkResolver, Switch
from tests.fuzz.registry import Invariant, pure


def _tag(seed: bytes) -> bytes:
    return hashlib.sha256(b"tag" + seed).digest()[:16]


def _info(tag: bytes, n: int) -> EpochInfo:
    return EpochInfo(tag, n, hashlib.sha256(tag).digest(), frozenset({"a", "b", "c"}))


def _seeds() -> list[bytes]:
    r = ForkResolver(window=3, retain_ms=1_000)
    root = _info(_tag(b"root"), 0)
    r.start(root, 0)
    out = [r.dump()]
    parent, snap = root, 1
    commits = []
    for k in range(3):
        c = ForkCommit(parent.tag, b"commit-%d" % k, k, k == 0, ("d",) if k == 0 else ())
        child = _info(_tag(c.commit), k + 1)
        r.entered(c, child, snap, 10 * k)
        commits.append(c)
        r.note_sent(child.tag, b"app-%d" % k)
        parent, snap = child, snap + 1
    out.append(r.dump())
    for leaf in range(3, 64):  # a sibling that beats commit-0, to journal a switch
        sibling = ForkCommit(root.tag, b"sibling", leaf, True, removed=("b",), covered=(b"r",))
        plan = r.on_commit(sibling)
        if isinstance(plan, Switch):
            r.begin_switch(plan, 99)
            out.append(r.dump())
            break
    return out


def load_target(data: bytes) -> None:
    r = ForkResolver.load(data)
    again = ForkResolver.load(r.dump())
    if again.dump() != r.dump():
        raise Invariant("dump/load is not stable")


pure("groups.fork_state", seeds=_seeds, target=load_target, allowed=(ForkError,))

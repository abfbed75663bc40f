"""The persisted branch state of one group (client.db v5, ``group_branches.state``).

What a restart must not lose in the middle of a branch switch (docs/groups.md, "A crash
in the middle of a switch"): the fork resolver (its epochs, commits, snapshots and the
ids of our texts per epoch), the members our own commits removed (removed again if such
a commit loses), the proposals of older live epochs kept for a sibling commit, and our
commit on its way (merged once the node stored it). Texts, pending resends, owed texts
and the trial marker are rows of their own (qpc_node/client/state.py).

Record version 2 (client.db v6) adds what a restart after a switch or a rejoin forgot:
the rejoin history (``past``: our branch's epochs kept for offers, up to
``rejoin.MAX_STEPS``, with their rejoin secrets, rosters, the ordering key of the commit
taken there and our texts sent there), the members our own commits added, the members to
add again and to remove again after a switch or rejoin, and when we last offered our
branch. A version 1 record still decodes (those fields empty).

The record is sealed by client.db; this module only encodes it. ``decode`` is the
parser of stored bytes: anything malformed or inconsistent is a ``BranchStateError``
(never another exception), and the caller drops the record (the group then starts a
fresh resolver, as a client without the record would).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from qpc_node.client.state import MAX_BRANCH_TEXTS, ClientStateError
from qpc_node.groups.fork import BRANCH_TAG_LEN, ForkError, ForkResolver, OrderKey
from qpc_node.groups.rejoin import KEY_LEN, MAX_STEPS

VERSION = 2
MAX_REJOINED_FROM = 8
"""Winner tips a record remembers having rejoined from: the offer that made us rejoin
may come again (delivered again after a crash); a few rejoins in a row fit."""
_READS = (1, 2)
MAX_KEPT_PROPOSALS = 256
"""Proposals of one older live epoch kept at most (branches.py MAX_OLD_PROPOSALS)."""
MAX_RECORD_BYTES = 64 * 1024 * 1024
"""A record larger than this is not ours (a resolver holds a window of commits)."""


class BranchStateError(ClientStateError):
    """A stored branch record that does not decode or does not fit together."""


class PastEpoch(msgspec.Struct):
    """One epoch of our branch kept for rejoin offers (branches.py ``_Group.past``)."""

    tag: bytes
    epoch: int
    key: bytes
    """Its rejoin secret (``rejoin.rejoin_key``): seals its step in our offers."""
    members: frozenset[str]
    child: OrderKey | None = None
    """The ordering key of the commit our branch took in this epoch (None: the tip)."""
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    sent: list[bytes] = msgspec.field(default_factory=list)
    """Our texts' app ids sent in this epoch."""


class BranchState(msgspec.Struct):
    resolver: ForkResolver
    own_removed: set[str] = msgspec.field(default_factory=set)
    old_proposals: dict[bytes, list[bytes]] = msgspec.field(default_factory=dict)
    own_commit: bytes | None = None
    own_added: set[str] = msgspec.field(default_factory=set)
    past: list[PastEpoch] = msgspec.field(default_factory=list)
    """Oldest first; the last one is normally the resolver's tip (the restore checks;
    empty in a version 1 record)."""
    readd: set[str] = msgspec.field(default_factory=set)
    """Members a switch or rejoin decided we add again, not requested yet."""
    rejoin_removed: set[str] = msgspec.field(default_factory=set)
    offered: tuple[bytes, int, int] = (b"", 0, 0)
    """(tip tag, wall ms, offers at this tip) of our last offer (their back-off)."""
    rejoined_from: list[bytes] = msgspec.field(default_factory=list)
    """Winner tips we rejoined from (an optional key of version 2: absent is none)."""


def encode(state: BranchState) -> bytes:
    # Consecutive epochs mostly share a roster (self-updates, texts): each distinct
    # roster is written once. Only the newest MAX_BRANCH_TEXTS text ids are kept (no
    # older text has a body left to resend).
    rosters: dict[frozenset[str], int] = {}
    budget = MAX_BRANCH_TEXTS
    past: list[list[Any]] = []
    for p in reversed(state.past):
        sent = p.sent[max(0, len(p.sent) - budget) :]
        budget -= len(sent)
        child = (
            None if p.child is None else [p.child.kind, p.child.rank.hex(), p.child.digest.hex()]
        )
        past.append(
            [
                p.tag.hex(),
                p.epoch,
                p.key.hex(),
                rosters.setdefault(p.members, len(rosters)),
                child,
                list(p.added),
                list(p.removed),
                [a.hex() for a in sent],
            ]
        )
    past.reverse()
    doc = {
        "v": VERSION,
        "resolver": state.resolver.dump().decode(),
        "own_removed": sorted(state.own_removed),
        "old_proposals": [
            [tag.hex(), [p.hex() for p in ps]] for tag, ps in state.old_proposals.items()
        ],
        "own_commit": None if state.own_commit is None else state.own_commit.hex(),
        "own_added": sorted(state.own_added),
        "rosters": [sorted(r) for r in rosters],
        "past": past,
        "readd": sorted(state.readd),
        "rejoin_removed": sorted(state.rejoin_removed),
        "offered": [state.offered[0].hex(), state.offered[1], state.offered[2]],
        "rejoined_from": [t.hex() for t in state.rejoined_from],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(data: bytes) -> BranchState:
    """Inverse of ``encode``; BranchStateError for anything else."""
    if len(data) > MAX_RECORD_BYTES:
        raise BranchStateError("branch record too large")
    try:
        return _decode(json.loads(data))
    except BranchStateError:
        raise
    except ForkError as exc:
        raise BranchStateError(f"bad fork state in branch record: {exc}") from None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise BranchStateError(f"malformed branch record: {exc}") from None


def _hex(v: Any) -> bytes:
    if not isinstance(v, str):
        raise BranchStateError("expected hex")
    return bytes.fromhex(v)


def _strs(v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(m, str) for m in v):
        raise BranchStateError("expected a list of members")
    return v


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**63:
        raise BranchStateError("expected a non-negative integer")
    return v


def _bytes_of(v: Any, n: int) -> bytes:
    b = _hex(v)
    if len(b) != n:
        raise BranchStateError(f"expected {n} bytes")
    return b


def _past(doc: dict[str, Any]) -> list[PastEpoch]:
    rosters = [frozenset(_strs(r)) for r in doc["rosters"]]
    entries = doc["past"]
    if not isinstance(entries, list) or len(entries) > MAX_STEPS:
        raise BranchStateError("expected at most MAX_STEPS past epochs")
    out: list[PastEpoch] = []
    texts = 0
    for e in entries:
        if not isinstance(e, list) or len(e) != 8:
            raise BranchStateError("expected a past epoch of 8 fields")
        tag_hex, epoch, key, roster, child, added, removed, sent = e
        if not isinstance(roster, int) or not 0 <= roster < len(rosters):
            raise BranchStateError("past epoch names no roster")
        key_of = None
        if child is not None:
            if not isinstance(child, list) or len(child) != 3 or type(child[0]) is not int:
                raise BranchStateError("expected an ordering key")
            if child[0] not in (0, 1):
                raise BranchStateError("expected an ordering key")
            key_of = OrderKey(child[0], _bytes_of(child[1], 32), _bytes_of(child[2], 32))
        if not isinstance(sent, list):
            raise BranchStateError("expected a list of app ids")
        texts += len(sent)
        out.append(
            PastEpoch(
                _bytes_of(tag_hex, BRANCH_TAG_LEN),
                _int(epoch),
                _bytes_of(key, KEY_LEN),
                rosters[roster],
                key_of,
                tuple(_strs(added)),
                tuple(_strs(removed)),
                [_hex(a) for a in sent],
            )
        )
    if texts > MAX_BRANCH_TEXTS:
        raise BranchStateError("too many text ids in the rejoin history")
    if len({p.tag for p in out}) != len(out):
        raise BranchStateError("an epoch twice in the rejoin history")
    # An epoch before the tip may lack the ordering key of a commit of ours: after a
    # rejoin, the tip of the branch we left has none (the external commit started the
    # new branch from the winner's epoch), and the record keeps that history.
    return out


def _decode(doc: Any) -> BranchState:
    if not isinstance(doc, dict) or doc.get("v") not in _READS:
        raise BranchStateError("unknown branch record version")
    resolver_doc = doc["resolver"]
    if not isinstance(resolver_doc, str):
        raise BranchStateError("expected the resolver state as a string")
    resolver = ForkResolver.load(resolver_doc.encode())
    if resolver.pending is not None:
        # Saved only at stable points (branches.py): a half-done switch is never
        # recorded, the trial marker stands for it.
        raise BranchStateError("branch record holds a switch in progress")
    removed = doc["own_removed"]
    if not isinstance(removed, list) or not all(isinstance(m, str) for m in removed):
        raise BranchStateError("expected a list of members")
    live = set(resolver.live_path())
    kept: dict[bytes, list[bytes]] = {}
    entries = doc["old_proposals"]
    if not isinstance(entries, list):
        raise BranchStateError("expected a list of kept proposals")
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[1], list):
            raise BranchStateError("expected [tag, proposals]")
        tag = _hex(entry[0])
        if len(tag) != BRANCH_TAG_LEN or tag not in live or tag in kept:
            raise BranchStateError("kept proposals of an epoch not on the live path")
        if len(entry[1]) > MAX_KEPT_PROPOSALS:
            raise BranchStateError("too many kept proposals")
        kept[tag] = [_hex(p) for p in entry[1]]
    own = doc["own_commit"]
    state = BranchState(resolver, set(removed), kept, None if own is None else _hex(own))
    if doc["v"] == 1:
        return state
    state.own_added = set(_strs(doc["own_added"]))
    state.past = _past(doc)
    state.readd = set(_strs(doc["readd"]))
    state.rejoin_removed = set(_strs(doc["rejoin_removed"]))
    offered = doc["offered"]
    if not isinstance(offered, list) or len(offered) != 3:
        raise BranchStateError("expected [tag, wall ms, count]")
    state.offered = (_hex(offered[0]), _int(offered[1]), _int(offered[2]))
    tips = doc.get("rejoined_from", [])
    if not isinstance(tips, list) or len(tips) > MAX_REJOINED_FROM:
        raise BranchStateError("expected at most MAX_REJOINED_FROM tags")
    state.rejoined_from = [_bytes_of(t, BRANCH_TAG_LEN) for t in tips]
    return state

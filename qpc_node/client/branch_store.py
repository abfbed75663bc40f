"""The persisted branch state of one group (client.db v5, ``group_branches.state``).

What a restart must not lose in the middle of a branch switch (docs/groups.md, "A crash
in the middle of a switch"): the fork resolver (its epochs, commits, snapshots and the
ids of our texts per epoch), the members our own commits removed (removed again if such
a commit loses), the proposals of older live epochs kept for a sibling commit, and our
commit on its way (merged once the node stored it). Texts, pending resends and the
trial marker are rows of their own (qpc_node/client/state.py).

The record is sealed by client.db; this module only encodes it. ``decode`` is the
parser of stored bytes: anything malformed or inconsistent is a ``BranchStateError``
(never another exception), and the caller drops the record (the group then starts a
fresh resolver, as a client without the record would).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qpc_node.client.state import ClientStateError
from qpc_node.groups.fork import BRANCH_TAG_LEN, ForkError, ForkResolver

VERSION = 1
MAX_KEPT_PROPOSALS = 256
"""Proposals of one older live epoch kept at most (branches.py MAX_OLD_PROPOSALS)."""
MAX_RECORD_BYTES = 64 * 1024 * 1024
"""A record larger than this is not ours (a resolver holds a window of commits)."""


class BranchStateError(ClientStateError):
    """A stored branch record that does not decode or does not fit together."""


@dataclass(slots=True)
class BranchState:
    resolver: ForkResolver
    own_removed: set[str] = field(default_factory=set)
    old_proposals: dict[bytes, list[bytes]] = field(default_factory=dict)
    own_commit: bytes | None = None


def encode(state: BranchState) -> bytes:
    doc = {
        "v": VERSION,
        "resolver": state.resolver.dump().decode(),
        "own_removed": sorted(state.own_removed),
        "old_proposals": [
            [tag.hex(), [p.hex() for p in ps]] for tag, ps in state.old_proposals.items()
        ],
        "own_commit": None if state.own_commit is None else state.own_commit.hex(),
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


def _decode(doc: Any) -> BranchState:
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
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
    return BranchState(resolver, set(removed), kept, None if own is None else _hex(own))

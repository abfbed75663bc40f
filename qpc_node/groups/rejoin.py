"""Rejoin offers: how the losing side of a partition longer than the rollback window
finds the winning branch (Stage B, sans-IO; docs/groups.md "Rejoin by external commit").

Beyond the window a member holds neither the fork epoch's MLS state (to stage the other
side's commit) nor a key the other side's messages are encrypted with: each side only
sees envelopes with branch tags it does not know. What both sides still share is the
*history* up to the fork. So every member keeps, for the epochs of its branch (up to
``MAX_STEPS``), an MLS exporter secret (``REJOIN_LABEL``) and the ordering key of the
commit its branch took there (:func:`qpc_node.groups.fork.order_key`, the same key an
in-window member compares).

An offer lists the sender's branch as ``(tag, step)`` pairs. Step ``i`` is sealed with the
rejoin secret of epoch ``tags[i]``: only members of that epoch open it. It carries the
ordering key of the sender's commit leaving that epoch and the key of ``content`` (the
sender's roster and the GroupInfo of its current epoch). A receiver opens the newest step
whose tag is on its own branch, the fork epoch, and compares the two keys there: the same
rule, at the same commit, as a member that could stage both commits. The side whose commit
loses rejoins by external commit; the other one does nothing.

Relays see the tags of the sender's branch in order (one more bit of linkage than the
tags on envelopes: which epochs follow which) and the size of its GroupInfo.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from qpc_node.errors import RemoteProtocolError
from qpc_node.groups.fork import BRANCH_TAG_LEN, Exporter, OrderKey
from qpc_node.wire.gen.qpc.v1 import client_pb2

__all__ = [
    "MAX_STEPS",
    "REJOIN_LABEL",
    "InvalidOffer",
    "Opened",
    "Step",
    "open_offer",
    "parse_offer",
    "rejoin_key",
    "seal_offer",
]

REJOIN_LABEL = "qpc/mesh/rejoin"
KEY_LEN = 32
NONCE_LEN = 12
MAX_STEPS = 32
"""Epochs of its branch a member keeps for offers: the MLS past-epoch cap (docs/groups.md).
A partition that lasted longer leaves no shared epoch to compare at."""
MAX_CONTENT = 1 << 20
"""A GroupInfo with its ratchet tree: ~0.5 KiB per member; far below this for our groups."""
FPR_LEN = 32
_DIGEST_LEN = 32
_STEP_PLAIN = 1 + 1 + 32 + _DIGEST_LEN + KEY_LEN
_STEP_LEN = NONCE_LEN + _STEP_PLAIN + 16


class InvalidOffer(RemoteProtocolError):
    """A BranchOffer that is malformed, or whose step for a shared epoch does not open."""


def rejoin_key(group: Exporter) -> bytes:
    """The current epoch's rejoin secret: seals its step in our later offers."""
    return group.export_secret(REJOIN_LABEL, b"", KEY_LEN)


class Step(msgspec.Struct, frozen=True):
    """One epoch of the sender's branch: its tag, its rejoin secret and the ordering key
    of the commit the branch took there (None for the current epoch)."""

    tag: bytes
    key: bytes
    child: OrderKey | None


class Opened(msgspec.Struct, frozen=True):
    fork_tag: bytes
    """The newest epoch the receiver shares with the sender's branch."""
    child: OrderKey | None
    """The sender's commit leaving the fork epoch (None: the sender is still there)."""
    tip_tag: bytes
    """The sender's current epoch: the parent of an external commit made from ``group_info``."""
    roster: tuple[str, ...]
    group_info: bytes


def _aad(kind: bytes, gid: bytes, tag: bytes) -> bytes:
    return b"qpc/rejoin/" + kind + bytes([len(gid)]) + gid + tag


def seal_offer(
    gid: bytes,
    steps: Sequence[Step],
    roster: Sequence[str],
    group_info: bytes,
    rand: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """The BranchOffer bytes for our branch ``steps`` (oldest first, the last one ours now)."""
    if not steps or len(steps) > MAX_STEPS or steps[-1].child is not None:
        raise ValueError("steps must end at the current epoch and number 1..MAX_STEPS")
    content_key = rand(KEY_LEN)
    body = len(roster).to_bytes(2, "big") + b"".join(bytes.fromhex(m) for m in roster)
    nonce = rand(NONCE_LEN)
    content = nonce + AESGCM(content_key).encrypt(
        nonce, body + group_info, _aad(b"content", gid, steps[-1].tag)
    )
    sealed: list[bytes] = []
    for s in steps:
        if s.child is None:
            plain = b"\x00" + bytes(1 + 32 + _DIGEST_LEN)
        else:
            plain = b"\x01" + bytes([s.child.kind]) + s.child.rank + s.child.digest
        nonce = rand(NONCE_LEN)
        sealed.append(
            nonce + AESGCM(s.key).encrypt(nonce, plain + content_key, _aad(b"step", gid, s.tag))
        )
    return client_pb2.BranchOffer(
        tags=[s.tag for s in steps], steps=sealed, content=content
    ).SerializeToString()


def parse_offer(data: bytes) -> client_pb2.BranchOffer:
    """The offer, its shape checked (bounded counts and sizes), nothing opened yet."""
    try:
        offer = client_pb2.BranchOffer.FromString(data)
    except DecodeError as exc:
        raise InvalidOffer(f"malformed BranchOffer: {exc}") from None
    n = len(offer.tags)
    if not 1 <= n <= MAX_STEPS or len(offer.steps) != n:
        raise InvalidOffer("a BranchOffer needs 1..32 tags and one step per tag")
    if any(len(t) != BRANCH_TAG_LEN for t in offer.tags):
        raise InvalidOffer("branch tag of the wrong length")
    if len(set(offer.tags)) != n:
        raise InvalidOffer("a branch tag repeats")
    if any(len(s) != _STEP_LEN for s in offer.steps):
        raise InvalidOffer("step of the wrong length")
    if not NONCE_LEN + 16 + 2 < len(offer.content) <= MAX_CONTENT:
        raise InvalidOffer("content of the wrong length")
    return offer


def _open(key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], aad)
    except InvalidTag:
        raise InvalidOffer("a step or the content does not open with the shared key") from None


def open_offer(gid: bytes, data: bytes, keys: Mapping[bytes, bytes]) -> Opened | None:
    """Open ``data`` with ``keys`` (tag -> rejoin secret of the epochs of our branch).

    None when the offer shares no epoch with us. InvalidOffer when it is malformed or a
    step of an epoch we share does not open (not from a member of that epoch)."""
    offer = parse_offer(data)
    tags = [bytes(t) for t in offer.tags]
    shared = [i for i, t in enumerate(tags) if t in keys]
    if not shared:
        return None
    i = shared[-1]
    plain = _open(keys[tags[i]], bytes(offer.steps[i]), _aad(b"step", gid, tags[i]))
    flag, kind = plain[0], plain[1]
    rank, digest = plain[2:34], plain[34 : 34 + _DIGEST_LEN]
    content_key = plain[-KEY_LEN:]
    last = i == len(tags) - 1
    if flag not in (0, 1) or (flag == 0) != last or kind not in (0, 1):
        raise InvalidOffer("step does not fit its place in the branch")
    child = OrderKey(kind, rank, digest) if flag else None
    body = _open(content_key, bytes(offer.content), _aad(b"content", gid, tags[-1]))
    count = int.from_bytes(body[:2], "big")
    end = 2 + FPR_LEN * count
    if end > len(body):
        raise InvalidOffer("roster runs past the content")
    roster = tuple(body[2 + FPR_LEN * k : 2 + FPR_LEN * (k + 1)].hex() for k in range(count))
    return Opened(tags[i], child, tags[-1], roster, body[end:])

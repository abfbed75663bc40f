"""store/federation.py relay_handover: a re-homed user's unacked mail moves from the
mailbox into custody in one transaction, once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from qpc_node.store import Envelope, Store
from qpc_node.store.fairness import SenderKey
from qpc_node.store.federation import (
    RelayItem,
    RelayQueueLimits,
    mailbox_has_mail,
    mailboxes_with_mail,
    relay_accept,
    relay_due,
    relay_handover,
)
from qpc_node.store.held import HoldItem, apply_receipt, delivered, hold_many, release
from qpc_node.storefwd import receipts as rc
from qpc_node.storefwd.held import HoldPolicy

NOW = 1_800_000_000_000
USER, STRANGER, FRIEND = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
HERE, HOP, OTHER = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32


def env(expiry: int = NOW + 3_600_000) -> Envelope:
    return Envelope(os.urandom(16), USER, expiry, 5, os.urandom(80))


def test_unacked_mail_moves_once_and_acked_mail_stays_gone(tmp_path: Path) -> None:
    with Store.open(tmp_path / "node.db") as s:
        s.enqueue([env()], NOW, sender=SenderKey.local(USER))  # from u to itself: accepted
        acked = env()
        s.enqueue([acked], NOW, sender=SenderKey.local(USER))
        s.ack(USER, up_to_seq=2)  # the first two were read and acked
        pending = [env(), env(), env()]
        s.enqueue(pending[:2], NOW, sender=SenderKey.relayed(HOP, STRANGER))
        s.enqueue(pending[2:], NOW, sender=SenderKey.local(FRIEND))
        expired = env(expiry=NOW + 10)
        s.enqueue([expired], NOW, sender=SenderKey.local(USER))
        limits = RelayQueueLimits()

        got = relay_handover(s, USER, HOP, HERE, NOW + 20, limits)
        assert (got.moved, got.already, got.left) == (3, 0, 0)
        assert s.depth(USER).messages == 1  # only the expired one, until the sweep
        assert not mailbox_has_mail(s, USER, NOW + 20)
        due = relay_due(s, HOP, NOW + 20, 10)
        assert sorted(q.envelope.msg_id for q in due) == sorted(e.msg_id for e in pending)
        assert all(q.handover for q in due)
        # The sender's origin goes with stranger mail (the new home's fairness keys on it).
        origins = {q.envelope.msg_id: q.origin for q in due}
        assert origins[pending[0].msg_id] == STRANGER
        # Idempotent: a second call finds nothing; a relay of the same id is a duplicate.
        again = relay_handover(s, USER, HOP, HERE, NOW + 20, limits)
        assert (again.moved, again.already, again.left) == (0, 0, 0)
        item = RelayItem(HOP, b"\xcc" * 32, pending[0], None)
        assert relay_accept(s, [item], NOW + 20, limits) == ["duplicate"]


def test_a_full_queue_toward_the_hop_moves_only_what_fits(tmp_path: Path) -> None:
    with Store.open(tmp_path / "node.db") as s:
        s.enqueue([env() for _ in range(5)], NOW, sender=SenderKey.local(USER))
        assert mailboxes_with_mail(s) == {USER}
        got = relay_handover(s, USER, HOP, HERE, NOW, RelayQueueLimits(max_per_hop=3))
        assert (got.moved, got.left) == (3, 2)
        assert mailbox_has_mail(s, USER, NOW)
        assert s.depth(USER).messages == 2
        relay_handover(s, USER, OTHER, HERE, NOW, RelayQueueLimits())
        assert mailboxes_with_mail(s) == set()


def _tombstone(s: Store, e: Envelope, home_key: ed25519.Ed25519PrivateKey) -> bytes:
    """e was relayed here toward its home and the home's receipt came back: a
    delivered tombstone with the receipt; returns the home's node id."""
    pub = home_key.public_key().public_bytes_raw()
    item = RelayItem(HOP, OTHER, e, None)
    assert relay_accept(s, [item], NOW, RelayQueueLimits()) == ["queued"]
    r = rc.make_receipt(home_key.sign, pub, e.msg_id, e.recipient, NOW + 1)
    apply_receipt(s, e.msg_id, HOP, r.to_proto().SerializeToString())
    assert delivered(s, e.msg_id)
    return hashlib.sha256(pub).digest()


def test_a_handover_passes_a_delivered_tombstone_once(tmp_path: Path) -> None:
    """A relay that passed mail to the user's old home keeps its delivered tombstone;
    the old home's hand-over of the same msg_id (the user re-homed: its home is
    another node now) is queued on, once. A real duplicate is still one."""
    old_home = ed25519.Ed25519PrivateKey.generate()
    limits = RelayQueueLimits()
    with Store.open(tmp_path / "node.db") as s:
        e = env()
        old = _tombstone(s, e, old_home)
        plain = RelayItem(OTHER, HOP, e, None)
        assert relay_accept(s, [plain], NOW + 2, limits) == ["duplicate"]  # a late copy
        moved = RelayItem(OTHER, HOP, e, None, handover=True, home=OTHER)
        assert relay_accept(s, [moved], NOW + 2, limits) == ["queued"]
        (q,) = relay_due(s, OTHER, NOW + 2, 10)
        assert q.handover and q.envelope.msg_id == e.msg_id  # forwarded as a hand-over
        assert not delivered(s, e.msg_id)  # open until the new home's receipt
        # Queued right now: a second hand-over is a duplicate.
        assert relay_accept(s, [moved], NOW + 2, limits) == ["duplicate"]
        new_home = ed25519.Ed25519PrivateKey.generate()
        pub = new_home.public_key().public_bytes_raw()
        r = rc.make_receipt(new_home.sign, pub, e.msg_id, USER, NOW + 3)
        got = apply_receipt(s, e.msg_id, OTHER, r.to_proto().SerializeToString())
        assert got.peers == (HOP,)  # the new home's receipt goes back to the old home
        assert got.purged_queued == {OTHER: 1}
        # Delivered again: a replayed hand-over passes no more.
        assert relay_accept(s, [moved], NOW + 4, limits) == ["duplicate"]
        assert relay_due(s, OTHER, NOW + 4, 10) == []
        assert old != hashlib.sha256(pub).digest()


def test_a_handover_claim_for_a_user_who_stayed_is_a_duplicate(tmp_path: Path) -> None:
    """The flag cannot replay delivered mail to a user still homed where the receipt
    came from, nor pass a tombstone whose receipt or recipient's home is unknown."""
    home = ed25519.Ed25519PrivateKey.generate()
    limits = RelayQueueLimits()
    with Store.open(tmp_path / "node.db") as s:
        e = env()
        there = _tombstone(s, e, home)
        for claimed_home in (there, None):
            item = RelayItem(OTHER, HOP, e, None, handover=True, home=claimed_home)
            assert relay_accept(s, [item], NOW + 2, limits) == ["duplicate"]
        bare = env()
        assert relay_accept(s, [RelayItem(HOP, OTHER, bare, None)], NOW, limits) == ["queued"]
        apply_receipt(s, bare.msg_id, HOP)  # a tombstone without its receipt
        item = RelayItem(OTHER, HOP, bare, None, handover=True, home=OTHER)
        assert relay_accept(s, [item], NOW + 2, limits) == ["duplicate"]
        assert relay_due(s, OTHER, NOW + 2, 10) == []


def test_a_held_handover_passes_the_tombstone_and_is_released_as_one(tmp_path: Path) -> None:
    """A hop without a route to the new home holds the hand-over copy through its
    delivered tombstone (once), and its release forwards it still as a hand-over, so
    the next tombstone on the way lets it pass too."""
    policy = HoldPolicy()
    with Store.open(tmp_path / "node.db") as s:
        e = env()
        _tombstone(s, e, ed25519.Ed25519PrivateKey.generate())
        moved = HoldItem(e, None, HOP, HOP, 1, handover=True, home=OTHER)
        assert hold_many(s, [moved], NOW + 2, policy).outcomes == ["held"]
        assert hold_many(s, [moved], NOW + 2, policy).outcomes == ["duplicate"]
        assert release(s, USER, OTHER, NOW + 3, max_per_hop=10).moved == 1
        (q,) = relay_due(s, OTHER, NOW + 3, 10)
        assert q.handover and q.envelope.msg_id == e.msg_id
        # An ordinary held copy is released as ordinary custody.
        plain = env()
        hold_many(s, [HoldItem(plain, None, HOP, HOP, 1)], NOW + 3, policy)
        release(s, USER, OTHER, NOW + 4, max_per_hop=10)
        got = {x.envelope.msg_id: x.handover for x in relay_due(s, OTHER, NOW + 4, 10)}
        assert got == {e.msg_id: True, plain.msg_id: False}

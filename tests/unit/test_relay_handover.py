"""store/federation.py relay_handover: a re-homed user's unacked mail moves from the
mailbox into custody in one transaction, once."""

from __future__ import annotations

import os
from pathlib import Path

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

"""What the group protocol needs of the MLS core beyond seam 1's own tests.

Members keep chatting while proposals wait for their commit: on a mesh the commit
may be minutes away (or never come: the proposer re-proposes), so a queued proposal
must not block application messages (OpenMLS refuses to send with one queued; the
core sets them aside for the message, docs/groups.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from qpc_node import crypto


def _group(tmp_path: Path, n: int) -> tuple[list[crypto.Identity], list[crypto.Group]]:
    ids = [
        crypto.Identity.create(tmp_path / f"m{i}", os.urandom(32), durable=False) for i in range(n)
    ]
    g0 = ids[0].create_group()
    _commit, welcome = g0.add([i.key_package() for i in ids[1:]])
    g0.merge_pending_commit()
    return ids, [g0, *(i.join(welcome) for i in ids[1:])]


def test_members_send_while_a_proposal_is_queued_and_it_stays_queued(tmp_path: Path) -> None:
    _ids, (a, b, c) = _group(tmp_path, 3)
    prop, ref = b.propose_update()
    assert a.process(prop).kind == "proposal" and c.process(prop).kind == "proposal"
    # Everyone with the proposal queued (its proposer too) can still send.
    for sender, readers in ((a, (b, c)), (b, (a, c)), (c, (a, b))):
        ct = sender.encrypt(b"while pending")
        for r in readers:
            assert r.process(ct).data == b"while pending"
    assert a.pending_proposals() == [ref] and c.pending_proposals() == [ref]
    # The proposal is still there to commit, by reference, for everyone.
    commit, _welcome = a.commit_pending()
    ev = a.merge_pending_commit()
    assert list(ev.covered) == [ref]
    assert b.process(commit).kind == "commit" and c.process(commit).kind == "commit"
    assert a.epoch_authenticator() == b.epoch_authenticator() == c.epoch_authenticator()
    assert a.pending_proposals() == []


def test_sending_with_a_proposal_queued_survives_a_reopen(tmp_path: Path) -> None:
    secret = os.urandom(32)
    a_id = crypto.Identity.create(tmp_path / "a", secret)
    b_id = crypto.Identity.create(tmp_path / "b", os.urandom(32), durable=False)
    a = a_id.create_group()
    _c, welcome = a.add([b_id.key_package()])
    a.merge_pending_commit()
    b = b_id.join(welcome)
    prop, ref = b.propose_update()
    a.process(prop)
    a.encrypt(b"one")
    gid = bytes(a.group_id)
    del a, a_id
    a2 = crypto.Identity.open(tmp_path / "a", secret).group(gid)
    assert a2.pending_proposals() == [ref]

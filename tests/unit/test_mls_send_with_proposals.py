"""Sending while proposals wait for the committer (issue 14: a mesh committer may be
minutes away). OpenMLS refuses application messages while its proposal store is not
empty; the core sets the proposals aside for the encryption, so members keep talking and
the proposals are still committed afterwards."""

from __future__ import annotations

import os
from pathlib import Path

from qpc_node.crypto import Identity


def test_members_send_while_proposals_are_pending(tmp_path: Path) -> None:
    ids = [Identity.create(tmp_path / f"m{i}", os.urandom(32), durable=False) for i in range(3)]
    ga = ids[0].create_group()
    _c, welcome = ga.add([i.key_package() for i in ids[1:]])
    ga.merge_pending_commit()
    gb, gc = ids[1].join(welcome), ids[2].join(welcome)
    newcomer = Identity.create(tmp_path / "d", os.urandom(32), durable=False)
    proposal, ref = gb.propose_add(newcomer.key_package())
    for g in (ga, gc):
        g.process(proposal)
    # Every member, the proposer included, still sends and reads on this epoch.
    for sender, readers in ((gb, (ga, gc)), (gc, (ga, gb)), (ga, (gb, gc))):
        ct = sender.encrypt(b"while pending")
        assert sender.pending_proposals() == [ref]
        for r in readers:
            assert r.process(ct).data == b"while pending"
    commit, welcome2 = ga.commit_pending()
    mine = ga.merge_pending_commit()
    assert mine.covered == [ref] and welcome2 is not None
    for g in (gb, gc):
        assert g.process(commit).covered == [ref]
    assert newcomer.join(welcome2).epoch_authenticator() == ga.epoch_authenticator()

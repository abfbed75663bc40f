"""A rollback restores our leaf's private key when the merge we undo replaced it.

On a split mesh a member asks for a self-update, its side commits it, and the member
merges that commit (its old leaf key is deleted). When the other side's commit for the
same epoch arrives, the member rolls back to the fork epoch and stages that commit,
whose UpdatePath is encrypted to the *old* leaf key: the snapshot must give it back.
"""

from __future__ import annotations

import os
from pathlib import Path

from qpc_node import crypto


def test_sibling_commit_decrypts_after_rolling_back_our_own_update(tmp_path: Path) -> None:
    a, b, c, x = (
        crypto.Identity.create(tmp_path / f"m{i}", os.urandom(32), durable=False) for i in range(4)
    )
    ga = a.create_group()
    gid = ga.group_id
    _commit, welcome = ga.add([y.key_package() for y in (b, c, x)])
    ga.merge_pending_commit()
    assert welcome is not None
    gc, gx = c.join(welcome), x.join(welcome)
    b.join(welcome)
    # One side: x asks for an update, c commits it, x merges it (snapshot first).
    proposal, _ref = gx.propose_update()
    gc.process(proposal)
    theirs, _w = gc.commit_pending()
    gc.merge_pending_commit()
    fork = x.snapshot(gid)
    gx.process(theirs)
    # The other side: a removes c. x rolls back to the fork epoch and stages it.
    ours = ga.remove([c.fingerprint])
    ga.merge_pending_commit()
    x.rollback(gid, fork)
    ev = gx.process(ours)
    assert ev.kind == "commit" and c.fingerprint in ev.removed_members
    assert gx.epoch_authenticator() == ga.epoch_authenticator()

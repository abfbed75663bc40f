"""A Welcome into a group the member still holds (rust/src/mls.rs ``op_join``).

Stage B (docs/groups.md): a member added only on a branch that lost is added again on the
winner; its new Welcome carries the same group id as the losing branch's state it holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_mls_fork import members

from qpc_node.crypto import Identity, InvalidMessage


def test_welcome_into_a_group_we_hold_replaces_it(tmp_path: Path) -> None:
    """A member added only on a branch that lost is added again on the winner: the new
    Welcome (same group id) replaces the losing branch's state instead of failing with
    GroupAlreadyExists, and the member shares the winner's epoch."""
    ids, (ga, gb), _ = members(tmp_path, 2)
    c = Identity.create(tmp_path / "c", os.urandom(32), durable=False)
    fork = ids[0].snapshot(b"chat")
    _commit, losing = ga.add([c.key_package()])
    ga.merge_pending_commit()
    gc = c.join(losing)
    ids[0].rollback(b"chat", fork)
    commit, winning = ga.add([c.key_package()])
    ga.merge_pending_commit()
    gb.process(commit)
    gc = c.join(winning)
    assert gc.epoch_authenticator() == ga.epoch_authenticator() == gb.epoch_authenticator()
    assert gc.process(gb.encrypt(b"hi")).data == b"hi"
    with pytest.raises(InvalidMessage):
        c.join(b"\x00\x01junk")
    assert c.groups() == [b"chat"]  # a bad Welcome leaves the state it had

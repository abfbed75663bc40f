"""Rejoin offers (qpc_node/groups/rejoin.py) and the pieces of the client's rejoin by
external commit that need no node: golden bytes of the new wire message, which epoch an
offer is opened at, and the content type of an external commit (a PublicMessage).

Golden files live in tests/fixtures/wire/groups/; regenerate deliberately with

    QPC_REGEN_FIXTURES=1 .venv/bin/pytest tests/unit/test_client_rejoin.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_groups_branch_wire import golden
from test_mls_fork import members

from qpc_node.client.branches import CT_APPLICATION, CT_COMMIT, content_type
from qpc_node.groups.fork import OrderKey
from qpc_node.groups.rejoin import (
    MAX_STEPS,
    InvalidOffer,
    Step,
    open_offer,
    parse_offer,
    seal_offer,
)
from qpc_node.wire.gen.qpc.v1 import client_pb2

GID = bytes(range(16))
TAGS = [bytes([k]) * 16 for k in range(1, 6)]
KEYS = {t: bytes([k + 100]) * 32 for k, t in enumerate(TAGS)}
LOW = OrderKey(0, b"\x01" * 32, b"\x02" * 32)
HIGH = OrderKey(1, b"\x03" * 32, b"\x04" * 32)
ROSTER = ["aa" * 32, "bb" * 32]


def counting_rand() -> object:
    counter = iter(range(1 << 20))
    return lambda n: bytes([next(counter) % 256]) * n


def offer(n: int = 4, keys: dict[bytes, bytes] = KEYS) -> bytes:
    steps = [Step(t, keys[t], LOW if k < n - 1 else None) for k, t in enumerate(TAGS[:n])]
    return seal_offer(GID, steps, ROSTER, b"group-info", counting_rand())  # type: ignore[arg-type]


def test_offer_bytes_are_pinned() -> None:
    data = offer(2)
    golden("branch_offer", data)
    sealed = client_pb2.Sealed(kind=client_pb2.Sealed.REJOIN_OFFER, group_id=GID, data=data)
    golden("sealed_rejoin_offer", sealed.SerializeToString())
    assert client_pb2.Sealed.REJOIN_OFFER == 3  # new enum value: old ones keep their numbers


def test_offer_opens_at_the_newest_shared_epoch() -> None:
    """The receiver shares the first two epochs: it opens the second one (the fork),
    learns the sender's commit there, its current epoch, roster and GroupInfo."""
    mine = {t: KEYS[t] for t in TAGS[:2]}
    opened = open_offer(GID, offer(4), mine)
    assert opened is not None
    assert (opened.fork_tag, opened.child, opened.tip_tag) == (TAGS[1], LOW, TAGS[3])
    assert opened.roster == tuple(ROSTER) and opened.group_info == b"group-info"
    # Shared up to the sender's current epoch: it has no commit we lack.
    assert open_offer(GID, offer(2), {t: KEYS[t] for t in TAGS[:3]}).child is None  # type: ignore[union-attr]
    assert open_offer(GID, offer(4), {TAGS[4]: KEYS[TAGS[4]]}) is None


def test_offer_from_outside_the_epoch_or_group_does_not_open() -> None:
    forged = offer(3, {**KEYS, TAGS[1]: b"\x00" * 32})
    with pytest.raises(InvalidOffer):
        open_offer(GID, forged, {TAGS[1]: KEYS[TAGS[1]]})
    with pytest.raises(InvalidOffer):  # bound to the group id
        open_offer(bytes(16), offer(3), {TAGS[1]: KEYS[TAGS[1]]})


@pytest.mark.parametrize(
    "bad",
    [
        b"\xff\xff",
        client_pb2.BranchOffer().SerializeToString(),
        client_pb2.BranchOffer(tags=[b"x" * 16], steps=[], content=b"c" * 64).SerializeToString(),
        client_pb2.BranchOffer(
            tags=[b"x" * 15], steps=[b"s" * 126], content=b"c" * 64
        ).SerializeToString(),
        client_pb2.BranchOffer(
            tags=[bytes([k]) * 16 for k in range(MAX_STEPS + 1)],
            steps=[b"s" * 126] * (MAX_STEPS + 1),
            content=b"c" * 64,
        ).SerializeToString(),
    ],
)
def test_malformed_offers_are_typed_errors(bad: bytes) -> None:
    with pytest.raises(InvalidOffer):
        parse_offer(bad)


def test_content_type_reads_an_external_commit(tmp_path: Path) -> None:
    """A rejoin's commit is a PublicMessage (sender new_member_commit, no index): the
    branch code must see a commit there to stage it on the tip like any other."""
    ids, (ga, gb, _gc), _ = members(tmp_path, 3)
    _g, commit = ids[2].join_external(ga.group_info())
    assert int.from_bytes(commit[2:4], "big") == 1  # PublicMessage
    assert content_type(commit) == CT_COMMIT
    assert gb.process(commit).kind == "commit"
    assert content_type(ga.encrypt(b"x")) == CT_APPLICATION


def test_a_catch_up_answers_a_member_of_the_fork_with_texts_it_was_sent_once() -> None:
    """Branches.catch_up: our texts of the epochs after the fork whose roster held the
    asking member; nothing for a member that was not in the fork epoch, nothing of an
    epoch whose roster lacked it, and each (member, fork) once."""
    from qpc_node.client.branch_store import PastEpoch
    from qpc_node.client.branches import Branches, _Group
    from qpc_node.groups.fork import ForkResolver

    a, b, j = "aa" * 32, "bb" * 32, "cc" * 32
    past = {
        TAGS[0]: PastEpoch(TAGS[0], 1, KEYS[TAGS[0]], frozenset({a, b}), LOW, sent=[b"t0"]),
        TAGS[1]: PastEpoch(TAGS[1], 2, KEYS[TAGS[1]], frozenset({a, b}), LOW, sent=[b"t1"]),
        TAGS[2]: PastEpoch(
            TAGS[2], 3, KEYS[TAGS[2]], frozenset({a}), LOW, sent=[b"t2"]
        ),  # b not in it
        TAGS[3]: PastEpoch(TAGS[3], 4, KEYS[TAGS[3]], frozenset({a, b, j}), None, sent=[b"t3"]),
    }
    branches = object.__new__(Branches)
    branches._groups = {GID: _Group(ForkResolver(), past=past)}
    assert branches.catch_up(GID, b, b"\x09" * 16) == []  # not an epoch of ours
    assert branches.catch_up(GID, j, TAGS[0]) == []  # j was not in the fork epoch
    assert branches.catch_up(GID, b, TAGS[0]) == [b"t1", b"t3"]
    assert branches.catch_up(GID, b, TAGS[0]) == []  # answered already
    assert branches.catch_up(GID, b, TAGS[1]) == [b"t3"]
    assert branches.catch_up(b"other" * 4, b, TAGS[0]) == []

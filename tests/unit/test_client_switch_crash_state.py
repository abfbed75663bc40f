"""client.db v5: what a branch switch persists (qpc_node/client/state.py, branch_store.py).

The record decoder turns anything malformed into BranchStateError; the rows keep texts
sealed, make a switch's resends pending in the transaction that saves the resolver, queue
a resend and forget it atomically, and remember shown (sender, app id) pairs until their
expiry. The end-to-end crash scenarios are in tests/integration/test_client_switch_crash.py.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from qpc_node.client import state as state_mod
from qpc_node.client.branch_store import (
    BranchState,
    BranchStateError,
    PastEpoch,
    decode,
    encode,
)
from qpc_node.client.state import (
    DB_FILE,
    MAX_BRANCH_TEXTS,
    TEXT_SEEN_KEEP_MS,
    ClientState,
    ClientStateError,
    OwedText,
)
from qpc_node.groups.fork import EpochInfo, ForkCommit, ForkResolver, OrderKey, Switch

SECRET = b"s" * 32
GID = b"g" * 16


def _tag(seed: bytes) -> bytes:
    return hashlib.sha256(b"tag" + seed).digest()[:16]


def _info(tag: bytes, n: int) -> EpochInfo:
    return EpochInfo(tag, n, hashlib.sha256(tag).digest(), frozenset({"a", "b", "c"}))


def _resolver() -> tuple[ForkResolver, list[bytes]]:
    r = ForkResolver(window=3, retain_ms=1_000)
    root = _info(_tag(b"root"), 0)
    r.start(root, 0)
    parent, tags = root, [root.tag]
    for k in range(2):
        c = ForkCommit(parent.tag, b"commit-%d" % k, k, True, removed=("c",) if k == 0 else ())
        child = _info(_tag(c.commit), k + 1)
        r.entered(c, child, k + 1, 10 * k)
        parent = child
        tags.append(child.tag)
    return r, tags


def test_a_record_round_trips() -> None:
    r, tags = _resolver()
    state = BranchState(r, {"c"}, {tags[1]: [b"proposal"]}, b"our commit")
    back = decode(encode(state))
    assert back.resolver.dump() == r.dump()
    assert back.own_removed == {"c"}
    assert back.old_proposals == {tags[1]: [b"proposal"]}
    assert back.own_commit == b"our commit"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"v": 2}',
        b'{"v": 1}',
        b'{"v": 1, "resolver": 5, "own_removed": [], "old_proposals": [], "own_commit": null}',
        b'{"v": 1, "resolver": "{}", "own_removed": [], "old_proposals": [], "own_commit": null}',
        b"[" * 100_000,
    ],
)
def test_malformed_records_are_a_typed_error(data: bytes) -> None:
    with pytest.raises(BranchStateError):
        decode(data)


def test_records_that_do_not_fit_together_are_a_typed_error() -> None:
    r, tags = _resolver()
    good = encode(BranchState(r))
    assert decode(good).resolver.tip == r.tip
    stale = encode(BranchState(r, old_proposals={_tag(b"elsewhere"): [b"p"]}))
    with pytest.raises(BranchStateError, match="live path"):
        decode(stale)
    too_many = BranchState(r, old_proposals={tags[1]: [b"p"] * 257})
    with pytest.raises(BranchStateError, match="too many"):
        decode(encode(too_many))
    for leaf in range(3, 64):  # a sibling that wins: a journalled switch
        plan = r.on_commit(ForkCommit(tags[0], b"sibling", leaf, True, removed=("b",)))
        if isinstance(plan, Switch):
            r.begin_switch(plan, 99)
            break
    assert r.pending is not None
    with pytest.raises(BranchStateError, match="in progress"):
        decode(encode(BranchState(r)))


def test_a_switch_makes_resends_pending_and_forgets_losing_texts(tmp_path: Path) -> None:
    st = ClientState(tmp_path, SECRET)
    st.branch_save(GID, b"state-1", live_tags=[b"A" * 16, b"B" * 16])
    st.branch_text_add(GID, b"id-a", b"A" * 16, b"body-a", 1_000)
    st.branch_text_add(GID, b"id-b", b"B" * 16, b"body-b", 1_000)
    assert st.branch_trial(GID, 7)
    rec = st.branch_record(GID)
    assert rec is not None and rec.trial == 7 and rec.texts_seq == 0
    assert [t.app_id for t in st.branch_texts_after(GID, 0)] == [b"id-a", b"id-b"]
    # The switch: B lost (off the live path), its text is resent; the marker clears.
    st.branch_save(GID, b"state-2", live_tags=[b"A" * 16, b"C" * 16], resend=[b"id-b"])
    rec = st.branch_record(GID)
    assert rec is not None and rec.state == b"state-2" and rec.trial is None
    assert rec.texts_seq == 2
    assert [(r.app_id, r.body) for r in st.branch_resends()] == [(b"id-b", b"body-b")]
    assert [t.app_id for t in st.branch_texts_after(GID, 0)] == [b"id-a"]
    # Queued and forgotten in one transaction.
    st.resend_queued(GID, b"id-b", [(b"m" * 16, b"envelope")], 2_000)
    assert st.branch_resends() == []
    assert st.outbox_len() == 1
    # Sealed at rest: neither text nor state is in the file in clear.
    st.close()
    raw = (tmp_path / DB_FILE).read_bytes()
    assert b"body-a" not in raw and b"state-2" not in raw


def test_a_tampered_row_is_a_typed_error_or_dropped(tmp_path: Path) -> None:
    st = ClientState(tmp_path, SECRET)
    st.branch_save(GID, b"state", live_tags=[b"A" * 16])
    st.branch_text_add(GID, b"id-a", b"A" * 16, b"body-a", 1_000)
    st.branch_save(GID, b"state", live_tags=[b"C" * 16], resend=[b"id-a"])
    st.close()
    conn = sqlite3.connect(tmp_path / DB_FILE)
    conn.execute("UPDATE group_branches SET state = x'00112233445566778899aabbccddeeff00'")
    conn.execute("UPDATE branch_resends SET body = x'00112233445566778899aabbccddeeff00'")
    conn.commit()
    conn.close()
    st = ClientState(tmp_path, SECRET)
    with pytest.raises(ClientStateError):
        st.branch_record(GID)
    assert st.branch_resends() == []  # the bad row is dropped, not returned
    st.branch_drop(GID, resends=True)
    assert st.branch_record(GID) is None and st.branch_groups() == []


def test_shown_texts_are_remembered_until_their_expiry(tmp_path: Path) -> None:
    st = ClientState(tmp_path, SECRET)
    sender = b"\x01" * 32
    st.store_received(1, "team", sender, "hi", 1_000, cursor=1, app_id=b"app-1")
    assert st.text_seen(sender, b"app-1")
    assert not st.text_seen(b"\x02" * 32, b"app-1")  # per sender
    assert not st.text_seen(sender, b"")  # no id: never a duplicate
    st.close()
    st = ClientState(tmp_path, SECRET)
    assert st.text_seen(sender, b"app-1")  # across a restart
    st.prune_branch_state(1_000 + TEXT_SEEN_KEEP_MS - 1, 10**12)
    assert st.text_seen(sender, b"app-1")
    st.prune_branch_state(1_000 + TEXT_SEEN_KEEP_MS + 1, 10**12)
    assert not st.text_seen(sender, b"app-1")
    st.close()
    assert sender not in (tmp_path / DB_FILE).read_bytes()  # keyed: who sent is not stored


def test_old_texts_are_pruned_and_kept_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_mod, "MAX_BRANCH_TEXTS", 4)
    st = ClientState(tmp_path, SECRET)
    st.branch_save(GID, b"state", live_tags=[b"A" * 16])
    st.branch_text_add(GID, b"old", b"A" * 16, b"x", 1_000)
    st.branch_text_add(GID, b"new", b"A" * 16, b"y", 5_000)
    st.prune_branch_state(6_000, 3_000)
    assert [t.app_id for t in st.branch_texts_after(GID, 0)] == [b"new"]
    for k in range(10):
        st.branch_text_add(GID, b"t%d" % k, b"A" * 16, b"z", 6_000)
    assert [t.app_id for t in st.branch_texts_after(GID, 0)] == [b"t6", b"t7", b"t8", b"t9"]


def _history(tags: list[bytes]) -> list[PastEpoch]:
    keys = [OrderKey(0, bytes([k]) * 32, bytes([k + 1]) * 32) for k in range(len(tags))]
    roster = frozenset({"aa" * 32, "bb" * 32})
    out = [
        PastEpoch(t, k, bytes([k + 7]) * 32, roster, keys[k], ("cc" * 32,) if k == 0 else ())
        for k, t in enumerate(tags)
    ]
    out[-1].child = None
    out[-1].members = roster | {"cc" * 32}
    out[-1].sent = [b"app-1", b"app-2"]
    return out


def test_a_version_2_record_keeps_what_a_restart_forgot(tmp_path: Path) -> None:
    """Record v2 (client.db v6): the rejoin history, the members our commits added, the
    adds and removals still to ask for and the offer back-off come back after the
    client state is closed and opened again; a version 1 record still decodes."""
    r, tags = _resolver()
    past = _history(tags)
    state = BranchState(
        r,
        {"c"},
        own_added={"ee" * 32},
        past=past,
        readd={"ee" * 32},
        rejoin_removed={"dd" * 32},
        offered=(tags[-1], 5_000, 2),
        rejoined_from=[tags[0]],
    )
    # After a rejoin the tip of the branch we left has no commit of ours after it.
    past[1].child = None
    st = ClientState(tmp_path, SECRET)
    st.branch_save(GID, encode(state), live_tags=tags)
    st.close()
    st = ClientState(tmp_path, SECRET)
    rec = st.branch_record(GID)
    assert rec is not None
    back = decode(rec.state)
    assert back.past == past
    assert back.own_added == back.readd == {"ee" * 32}
    assert back.rejoin_removed == {"dd" * 32}
    assert back.offered == (tags[-1], 5_000, 2)
    assert back.rejoined_from == [tags[0]]
    assert back.own_removed == {"c"} and back.resolver.dump() == r.dump()
    # Each distinct roster is written once.
    assert len(json.loads(encode(state))["rosters"]) == 2
    v1 = json.loads(encode(BranchState(r, {"c"})))
    v1["v"] = 1
    keys = ("own_added", "rosters", "past", "readd", "rejoin_removed", "offered")
    for k in (*keys, "rejoined_from"):
        del v1[k]
    v2 = json.loads(encode(state))
    del v2["rejoined_from"]  # written before the key existed: none
    assert decode(json.dumps(v2).encode()).rejoined_from == []
    old = decode(json.dumps(v1).encode())
    assert old.past == [] and old.own_added == set() and old.own_removed == {"c"}


def test_the_rejoin_history_keeps_the_newest_text_ids_only() -> None:
    r, tags = _resolver()
    past = _history(tags)
    past[0].sent = [b"old-%d" % k for k in range(MAX_BRANCH_TEXTS)]
    back = decode(encode(BranchState(r, past=past)))
    assert back.past[-1].sent == [b"app-1", b"app-2"]
    assert len(back.past[0].sent) == MAX_BRANCH_TEXTS - 2
    assert back.past[0].sent[-1] == b"old-%d" % (MAX_BRANCH_TEXTS - 1)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(past="x"),
        lambda d: d.update(past=[[]]),
        lambda d: d["past"][0].__setitem__(3, 9),  # no such roster
        lambda d: d["past"][0].__setitem__(2, "00"),  # a short key
        lambda d: d.update(rejoined_from="00"),
        lambda d: d.update(rejoined_from=["00"]),  # a short tag
        lambda d: d.update(rejoined_from=[d["past"][0][0]] * 9),  # more than 8
        lambda d: d["past"][0].__setitem__(4, [2, "00" * 32, "00" * 32]),
        lambda d: d["past"][1].__setitem__(0, d["past"][0][0]),  # an epoch twice
        lambda d: d["past"][0].__setitem__(1, -1),
        lambda d: d.update(past=d["past"] * 11),  # more than MAX_STEPS
        lambda d: d.update(rosters=[[1]]),
        lambda d: d.update(own_added="ee"),
        lambda d: d.update(offered=["zz", 0, 0]),
        lambda d: d.update(offered=[]),
        lambda d: d.pop("readd"),
    ],
)
def test_malformed_version_2_records_are_a_typed_error(change: Any) -> None:
    r, tags = _resolver()
    doc = json.loads(encode(BranchState(r, past=_history(tags))))
    change(doc)
    with pytest.raises(BranchStateError):
        decode(json.dumps(doc).encode())


def test_owed_texts_survive_a_restart_and_are_sent_once(tmp_path: Path) -> None:
    """A switch stores each resend with who got it on the losing branch; queueing the
    resend makes the members not on the winner owed it, in the same transaction; the
    debt survives a close and open of client.db and is forgotten in the transaction that
    queues the owed copy."""
    e, f = b"\x0e" * 32, b"\x0f" * 32
    st = ClientState(tmp_path, SECRET)
    st.branch_save(GID, b"state", live_tags=[b"A" * 16])
    st.branch_text_add(GID, b"id-a", b"A" * 16, b"body-a", 1_000)
    st.branch_save(
        GID, b"state", live_tags=[b"C" * 16], resend=[b"id-a"], recipients={b"id-a": [f, e]}
    )
    st.close()
    st = ClientState(tmp_path, SECRET)
    (r,) = st.branch_resends()
    assert r.recipients == (e, f)
    st.resend_queued(GID, b"id-a", [(b"m" * 16, b"envelope")], 2_000, owed=[e])
    st.close()
    st = ClientState(tmp_path, SECRET)
    assert st.branch_resends() == []
    assert st.branch_owed(GID, [f]) == []
    assert st.branch_owed(GID, [e]) == [OwedText(e, b"id-a", b"body-a")]
    st.owed_queued(GID, e, [b"id-a"], [(b"n" * 16, b"owed copy")], 3_000)
    assert st.branch_owed(GID, [e]) == []
    assert st.outbox_len() == 2
    st.close()
    raw = (tmp_path / DB_FILE).read_bytes()
    assert b"body-a" not in raw and f not in raw  # sealed, also who got it


def test_owed_texts_are_pruned_and_dropped_with_the_group(tmp_path: Path) -> None:
    e = b"\x0e" * 32
    st = ClientState(tmp_path, SECRET)
    for gid in (GID, b"h" * 16):
        st.branch_save(gid, b"state", live_tags=[b"A" * 16])
        st.branch_text_add(gid, b"id-a", b"A" * 16, b"body-a", 1_000)
        st.branch_save(gid, b"state", live_tags=[b"C" * 16], resend=[b"id-a"])
        st.resend_queued(gid, b"id-a", [], 2_000, owed=[e])
    st.branch_drop(GID, resends=True)
    assert st.branch_owed(GID, [e]) == []
    assert len(st.branch_owed(b"h" * 16, [e])) == 1
    st.prune_branch_state(2_000 + 5_000, 5_000)
    assert len(st.branch_owed(b"h" * 16, [e])) == 1
    st.prune_branch_state(2_000 + 5_001, 5_000)
    assert st.branch_owed(b"h" * 16, [e]) == []


def test_a_v5_database_migrates_with_its_pending_resends(tmp_path: Path) -> None:
    """A pending resend written by a v5 client has no recipients: it is still read
    (nobody owed) after the v6 migration."""
    st = ClientState(tmp_path, SECRET)
    st.branch_save(GID, b"state", live_tags=[b"A" * 16])
    st.branch_text_add(GID, b"id-a", b"A" * 16, b"body-a", 1_000)
    st.branch_save(GID, b"state", live_tags=[b"C" * 16], resend=[b"id-a"])
    st.close()
    conn = sqlite3.connect(tmp_path / DB_FILE)
    conn.executescript(
        """
        DROP TABLE branch_owed;
        ALTER TABLE branch_resends DROP COLUMN recipients;
        UPDATE meta SET v = x'00000005' WHERE k = 'schema';
        """
    )
    conn.close()
    st = ClientState(tmp_path, SECRET)
    assert st.get_meta("schema") == (6).to_bytes(4, "big")
    (r,) = st.branch_resends()
    assert (r.app_id, r.body, r.recipients) == (b"id-a", b"body-a", ())

import sqlite3
import threading
from pathlib import Path

import pytest
import trio

from qpc_node.client import state as state_mod
from qpc_node.client.state import (
    DB_FILE,
    AsyncClientState,
    ClientState,
    ClientStateError,
    Conversation,
)

A = b"\xaa" * 32
B = b"\xbb" * 32


def test_conversations_and_contacts(tmp_path: Path) -> None:
    st = ClientState(tmp_path, b"k" * 32)
    st.add_conversation(Conversation("bob", b"g1", True, B, A), 1)
    with pytest.raises(ClientStateError):
        st.add_conversation(Conversation("bob", b"g2", False, None, A), 2)
    assert st.direct_with(B) == Conversation("bob", b"g1", True, B, A)
    assert st.conversation_by_group(b"g1") is not None
    assert st.see_contact(B, 1) and not st.see_contact(B, 2)
    impostor = B[:4] + b"\x00" * 28
    assert st.short_code_clash(impostor) == B
    assert st.short_code_clash(B) is None
    st.set_verified(B, 3)
    assert st.is_verified(B) and not st.is_verified(A)
    st.close()


def test_deleted_rows_are_zeroed_whatever_sqlites_build_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client state turns secure_delete on itself: Debian's SQLite has it on by default,
    the bundle's own build keeps that default, but another SQLite (a Python from elsewhere)
    need not; spent keys and old group states must not stay in the file's free pages."""
    connect = sqlite3.connect

    def default_off(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)  # type: ignore[arg-type]
        conn.execute("PRAGMA secure_delete = OFF")
        return conn

    monkeypatch.setattr(state_mod.sqlite3, "connect", default_off)
    st = ClientState(tmp_path, b"k" * 32)
    assert st._conn.execute("PRAGMA secure_delete").fetchone() == (1,)
    st.close()


def test_texts_sealed_cursor_and_reopen(tmp_path: Path) -> None:
    st = ClientState(tmp_path, b"k" * 32)
    st.store_received(5, "bob", B, "meet at the pump house", 10, cursor=5)
    st.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob(DB_FILE + "*"))
    assert b"pump house" not in raw
    st = ClientState(tmp_path, b"k" * 32)
    assert st.cursor() == 5
    (r,) = st.unshown()
    assert (r.seq, r.conv, r.sender, r.text) == (5, "bob", B, "meet at the pump house")
    assert st.unshown() == []
    st.close()
    wrong = ClientState(tmp_path, b"x" * 32)
    wrong._conn.execute("UPDATE inbox SET shown = 0")
    with pytest.raises(ClientStateError):
        wrong.unshown()
    wrong.close()


def test_outbox_survives_and_retries(tmp_path: Path) -> None:
    st = ClientState(tmp_path, b"k" * 32)
    st.outbox_add(b"m1", b"env1", 100)
    st.outbox_add(b"m1", b"env1", 100)  # idempotent
    st.outbox_add(b"m2", b"env2", 100)
    st.close()
    st = ClientState(tmp_path, b"k" * 32)
    assert [o.msg_id for o in st.outbox_due(100)] == [b"m1", b"m2"]
    st.outbox_retry_at(b"m1", 500)
    assert [o.msg_id for o in st.outbox_due(200)] == [b"m2"]
    st.outbox_done([b"m2"])
    assert st.outbox_len() == 1
    (o,) = st.outbox_due(500)
    assert o.attempts == 1
    st.close()


async def test_async_facade_runs_off_thread(tmp_path: Path) -> None:
    """Every call runs on a worker thread, never the Trio thread, one at a time."""
    st = ClientState(tmp_path, b"k" * 32)
    ast = AsyncClientState(st)
    trio_thread = threading.get_ident()
    ran_on: list[int] = []
    active = 0
    overlapped = False

    def probe(tag: bytes) -> int:
        nonlocal active, overlapped
        active += 1
        overlapped |= active > 1
        ran_on.append(threading.get_ident())
        st.outbox_add(tag, b"e", 1)
        active -= 1
        return st.outbox_len()

    assert await ast.call(probe, b"m") == 1
    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(ast.call, probe, bytes([i]))
    assert await ast.call(st.outbox_len) == 9
    assert len(ran_on) == 9 and trio_thread not in ran_on
    assert not overlapped  # the limiter serialises: one connection, one caller at a time
    st.close()
    with pytest.raises(sqlite3.ProgrammingError):
        st.outbox_len()


def test_held_messages_survive_and_leave_once(tmp_path: Path) -> None:
    st = ClientState(tmp_path, b"k" * 32)
    st.hold(4, b"p4", 1000, cursor=4)
    st.hold(4, b"p4", 1000, cursor=4)  # idempotent on seq
    st.hold(6, b"p6", 2000, cursor=6)
    st.close()
    st = ClientState(tmp_path, b"k" * 32)
    assert st.cursor() == 6 and st.held_count() == 2
    assert [(h.seq, h.payload, h.expiry_ms) for h in st.held()] == [
        (4, b"p4", 1000),
        (6, b"p6", 2000),
    ]
    st.held_tried(4)
    st.store_held_received(4, "team", B, "late", 10)
    st.held_done(6)
    assert st.held() == []
    (r,) = st.unshown()
    assert (r.seq, r.text) == (4, "late")
    st.close()


def test_pending_commit_records_survive_and_settle_atomically(tmp_path: Path) -> None:
    st = ClientState(tmp_path, b"k" * 32)
    st.outbox_add(b"plain", b"e0", 1)
    st.commit_begin(b"c1", b"g1", b"info", [(b"m1", b"e1"), (b"m2", b"e2")], 2)
    st.commit_begin(b"c2", b"g2", None, [(b"m3", b"e3")], 3)
    st.close()
    st = ClientState(tmp_path, b"k" * 32)
    assert [(o.msg_id, o.commit) for o in st.outbox_due(10)] == [
        (b"plain", None),
        (b"m1", b"c1"),
        (b"m2", b"c1"),
        (b"m3", b"c2"),
    ]
    assert [o.msg_id for o in st.outbox_of_commit(b"c1")] == [b"m1", b"m2"]
    st.outbox_done([b"m1", b"m2"])  # the node stored c1's fan-out
    st.commit_cancel(b"c2")  # ... and refused c2's for good
    recs = {p.commit_id: p for p in st.pending_commits()}
    assert (recs[b"c1"].remaining, recs[b"c1"].cancelled, recs[b"c1"].followup) == (
        0,
        False,
        b"info",
    )
    assert (recs[b"c2"].remaining, recs[b"c2"].cancelled) == (0, True)
    assert [o.msg_id for o in st.outbox_due(10)] == [b"plain"]
    st.commit_finished(b"c1", [(b"f1", b"ef")], 11)
    st.commit_finished(b"c2", [], 11)
    assert st.pending_commits() == [] and st.pending_commit(b"c1") is None
    assert [o.msg_id for o in st.outbox_due(11)] == [b"plain", b"f1"]
    st.close()


N1 = b"\x01" * 32
N2 = b"\x02" * 32


def test_contact_names_are_sealed_unique_and_removable(tmp_path: Path) -> None:
    st = ClientState(tmp_path, b"k" * 32)
    st.see_contact(A, 1)
    st.name_contact("bobthebuilder", B, 2)
    with pytest.raises(ClientStateError, match="taken"):
        st.name_contact("bobthebuilder", A, 3)
    st.name_contact("alice", A, 3)
    assert [(c.name, c.fingerprint) for c in st.contacts()] == [
        ("alice", A),
        ("bobthebuilder", B),
    ]
    st.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob(DB_FILE + "*"))
    assert b"bobthebuilder" not in raw
    st = ClientState(tmp_path, b"k" * 32)
    assert st.unname_contact("bobthebuilder") == B
    assert st.unname_contact("bobthebuilder") is None
    assert [(c.name, c.fingerprint) for c in st.contacts()] == [("alice", A), (None, B)]
    st.close()


def test_cursor_and_held_are_per_node(tmp_path: Path) -> None:
    """Mailbox seqs are a node's own numbering: seq 5 on one node is not seq 5 on another."""
    st = ClientState(tmp_path, b"k" * 32)
    st.store_received(5, "bob", B, "one", 10, cursor=5, node=N1)
    assert (st.cursor(N1), st.cursor(N2)) == (5, 0)
    st.hold(7, b"p1", 99, cursor=7, node=N1)
    st.hold(7, b"p2", 99, cursor=7, node=N2)
    assert sorted((h.node, h.payload) for h in st.held()) == [(N1, b"p1"), (N2, b"p2")]
    st.held_done(7, N1)
    assert [h.node for h in st.held()] == [N2]
    st.advance_cursor(3, node=N1)  # never backwards
    assert st.cursor(N1) == 7
    st.close()


def test_seen_ids_skip_a_second_copy_and_age_out(tmp_path: Path) -> None:
    st = ClientState(tmp_path, b"k" * 32)
    st.store_received(1, "bob", B, "hi", 10, cursor=1, node=N1, msg_id=b"m" * 16)
    st.advance_cursor(2, node=N1, msg_id=b"w" * 16, now_ms=20)
    assert st.seen(b"m" * 16) and st.seen(b"w" * 16) and not st.seen(b"x" * 16)
    assert st.forget_seen_before(15) == 1
    assert not st.seen(b"m" * 16) and st.seen(b"w" * 16)
    st.close()


def test_known_nodes_keep_the_last_rtt_and_count_failures(tmp_path: Path) -> None:
    st = ClientState(tmp_path, b"k" * 32)
    st.remember_node(N1, ["127.0.0.1:4433"], 2.5, 100)
    st.remember_node(N1, ["[fe80::1%3]:4433"], None, 200)  # unknown RTT keeps the last
    st.node_result(N1, ok=False)
    st.node_result(N1, ok=False)
    (n,) = st.nodes()
    assert (n.addresses, n.rtt_ms, n.last_seen_ms, n.failures) == (
        ("[fe80::1%3]:4433",),
        2.5,
        200,
        2,
    )
    st.node_result(N1, ok=True)
    assert st.nodes()[0].failures == 0
    st.close()


def test_a_v1_database_migrates_and_its_node_claims_the_cursor(tmp_path: Path) -> None:
    """A client from before the mesh had one cursor (meta) and held rows keyed by seq:
    the first node it logs in on after the upgrade takes both over."""
    conn = sqlite3.connect(tmp_path / DB_FILE)
    conn.executescript(state_mod._DDL)
    conn.execute("INSERT INTO meta (k, v) VALUES ('schema', ?)", ((1).to_bytes(4, "big"),))
    conn.execute("INSERT INTO meta (k, v) VALUES ('cursor', ?)", ((42).to_bytes(8, "big"),))
    conn.execute("INSERT INTO held (seq, payload, expiry_ms) VALUES (40, x'aa', 999)")
    conn.execute("INSERT INTO contacts (fingerprint, first_seen_ms) VALUES (?, 1)", (B,))
    conn.commit()
    conn.close()
    st = ClientState(tmp_path, b"k" * 32)
    assert st.get_meta("schema") == state_mod._SCHEMA.to_bytes(4, "big")
    assert st.cursor() == 42 and st.cursor(N1) == 0
    assert st.claim_cursor(N1)
    assert (st.cursor(N1), st.cursor()) == (42, 0)
    assert [(h.node, h.seq) for h in st.held()] == [(N1, 40)]
    assert not st.claim_cursor(N2)  # only the first node: the others start at 0
    assert [c.fingerprint for c in st.contacts()] == [B]
    st.close()
    st = ClientState(tmp_path, b"k" * 32)  # reopening does not migrate again
    assert st.cursor(N1) == 42
    st.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    st = ClientState(tmp_path, b"k" * 32)
    st.set_meta("schema", (99).to_bytes(4, "big"))
    st.close()
    with pytest.raises(ClientStateError, match="newer"):
        ClientState(tmp_path, b"k" * 32)


def test_channels_joined_sealed_cursors_and_left(tmp_path: Path) -> None:
    secret, cid = b"\x01" * 32, b"\xc1" * 32
    st = ClientState(tmp_path, b"k" * 32)
    st.join_channel("news", cid, secret, 1)
    with pytest.raises(ClientStateError, match="already joined as 'news'"):
        st.join_channel("other", cid, secret, 2)
    with pytest.raises(ClientStateError, match="exists"):
        st.join_channel("news", b"\xc2" * 32, b"\x02" * 32, 2)
    st.store_channel_received(7, "#news", A, "hi", 3, node=b"n1", channel_id=cid, msg_id=b"m1")
    st.advance_channel_cursor(b"n1", cid, 5)  # never backwards
    assert st.channel_cursors(b"n1") == {cid: 7} and st.channel_cursors(b"n2") == {}
    assert st.seen(b"m1")
    st.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob(DB_FILE + "*"))
    assert secret not in raw  # the secret is sealed at rest like contact names
    st = ClientState(tmp_path, b"k" * 32)
    assert st.channels() == [state_mod.JoinedChannel("news", cid, secret)]
    assert st.leave_channel("news") and not st.leave_channel("news")
    assert st.channels() == [] and st.channel_cursors(b"n1") == {}
    for i in range(state_mod.MAX_CHANNELS):
        st.join_channel(f"c{i}", bytes([i]) * 32, bytes([i]) * 32, 1)
    with pytest.raises(ClientStateError, match="leave one first"):
        st.join_channel("one-more", b"\xff" * 32, b"\xff" * 32, 1)
    st.close()

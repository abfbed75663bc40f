import sqlite3
from pathlib import Path

import pytest

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
    st = ClientState(tmp_path, b"k" * 32)
    ast = AsyncClientState(st)
    await ast.call(st.outbox_add, b"m", b"e", 1)
    assert await ast.call(st.outbox_len) == 1
    st.close()
    with pytest.raises(sqlite3.ProgrammingError):
        st.outbox_len()

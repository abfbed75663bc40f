"""Mailbox behaviour on a real SQLite file: idempotency, sequences, fetch, ack, expiry,
quotas and payload cap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qpc_node.errors import StatusCode
from qpc_node.store import (
    Envelope,
    EnvelopeExpired,
    InvalidRecord,
    PayloadTooLarge,
    QuotaExceeded,
    Store,
    StoreLimits,
)
from qpc_node.store.fairness import SenderKey
from qpc_node.store.store import EnqueueBatch

NOW = 1_700_000_000_000
HOUR = 3_600_000
ALICE = b"A" * 32
BOB = b"B" * 32


def env(n: int, to: bytes = ALICE, *, size: int = 100, expiry: int = NOW + HOUR) -> Envelope:
    return Envelope(n.to_bytes(16, "big"), to, expiry, 8, bytes([n % 251]) * size)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "node.db") as s:
        yield s


def test_sequences_are_per_recipient_and_monotonic(store: Store) -> None:
    first = store.enqueue([env(1), env(2, BOB), env(3)], NOW)
    assert [(r.seq, r.duplicate) for r in first] == [(1, False), (1, False), (2, False)]
    store.ack(ALICE, up_to_seq=2)
    # Even with the mailbox empty, numbering continues: clients detect gaps by seq.
    assert store.enqueue([env(4)], NOW)[0].seq == 3


def test_retried_enqueue_never_duplicates(store: Store) -> None:
    batch = [env(1), env(2)]
    original = store.enqueue(batch, NOW)
    for _ in range(5):
        retry = store.enqueue(batch, NOW)
        assert [(r.seq, r.duplicate) for r in retry] == [(r.seq, True) for r in original]
    # Duplicates inside one batch point at the first copy.
    inside = store.enqueue([env(7), env(7)], NOW)
    assert (inside[1].seq, inside[1].duplicate) == (inside[0].seq, True)
    page = store.fetch(ALICE, now_ms=NOW)
    assert [m.seq for m in page.messages] == [1, 2, 3]
    assert store.depth(ALICE).messages == 3


def test_retry_after_ack_is_still_a_duplicate(store: Store) -> None:
    store.enqueue([env(1)], NOW)
    store.ack(ALICE, up_to_seq=1)
    again = store.enqueue([env(1)], NOW + 1)
    assert again[0].duplicate and again[0].seq == 1
    assert store.fetch(ALICE, now_ms=NOW + 1).messages == ()


def test_same_msg_id_for_two_recipients_is_two_messages(store: Store) -> None:
    results = store.enqueue([env(1, ALICE), env(1, BOB)], NOW)
    assert not results[0].duplicate and not results[1].duplicate


def test_fetch_pages_by_cursor_limit_and_bytes(store: Store) -> None:
    store.enqueue([env(i, size=1000) for i in range(1, 11)], NOW)
    page = store.fetch(ALICE, now_ms=NOW, after_seq=2, limit=3)
    assert [m.seq for m in page.messages] == [3, 4, 5] and page.more
    assert page.last_seq == 10
    assert page.messages[0].envelope == env(3, size=1000)
    by_bytes = store.fetch(ALICE, now_ms=NOW, max_bytes=2500)
    assert [m.seq for m in by_bytes.messages] == [1, 2] and by_bytes.more
    # One message larger than max_bytes still comes through, alone.
    assert len(store.fetch(ALICE, now_ms=NOW, max_bytes=1).messages) == 1
    tail = store.fetch(ALICE, now_ms=NOW, after_seq=8)
    assert [m.seq for m in tail.messages] == [9, 10] and not tail.more


def test_ack_by_list_and_range_updates_depth(store: Store) -> None:
    store.enqueue([env(i) for i in range(1, 6)], NOW)
    assert store.ack(ALICE, seqs=[2, 4, 99]) == 2
    assert store.ack(ALICE, seqs=[2]) == 0  # acking twice is harmless
    assert [m.seq for m in store.fetch(ALICE, now_ms=NOW).messages] == [1, 3, 5]
    assert store.ack(ALICE, up_to_seq=3) == 2
    depth = store.depth(ALICE)
    assert (depth.messages, depth.bytes, depth.last_seq) == (1, 100, 5)


def test_expired_messages_are_never_fetched_and_are_swept(store: Store) -> None:
    store.enqueue([env(1, expiry=NOW + 10), env(2, expiry=NOW + HOUR)], NOW)
    store.ack(ALICE, seqs=[2])
    assert [m.seq for m in store.fetch(ALICE, now_ms=NOW + 10).messages] == []
    swept = store.expire_messages(NOW + 10)
    assert (swept.expired, swept.tombstones, swept.more) == (1, 0, False)
    assert store.depth(ALICE).messages == 0
    swept = store.expire_messages(NOW + HOUR)
    assert (swept.expired, swept.tombstones) == (0, 1)


def test_expiry_is_clamped_to_retention(tmp_path: Path) -> None:
    limits = StoreLimits(message_retention_ms=HOUR)
    with Store.open(tmp_path / "n.db", limits=limits) as store:
        store.enqueue([env(1, expiry=NOW + 100 * HOUR)], NOW)
        stored = store.fetch(ALICE, now_ms=NOW).messages[0]
        assert stored.envelope.expiry_ms == NOW + HOUR
        assert store.fetch(ALICE, now_ms=NOW + HOUR).messages == ()


def test_bounded_sweep_reports_more(store: Store) -> None:
    store.enqueue([env(i, expiry=NOW + 1) for i in range(1, 6)], NOW)
    first = store.expire_messages(NOW + 1, max_rows=3)
    assert (first.expired, first.more) == (3, True)
    assert store.expire_messages(NOW + 1, max_rows=3).expired == 2


def test_quota_rejects_whole_batch_and_leaves_data_untouched(tmp_path: Path) -> None:
    limits = StoreLimits(mailbox_max_messages=3, mailbox_max_bytes=1000)
    with Store.open(tmp_path / "n.db", limits=limits) as store:
        store.enqueue([env(1), env(2)], NOW)
        before = store.conn.execute("SELECT * FROM messages ORDER BY id").fetchall()
        depth_before = store.depth(ALICE)
        with pytest.raises(QuotaExceeded) as info:
            store.enqueue([env(3, BOB), env(4), env(5)], NOW)
        assert info.value.code is StatusCode.RESOURCE_EXHAUSTED
        assert store.conn.execute("SELECT * FROM messages ORDER BY id").fetchall() == before
        assert store.depth(ALICE) == depth_before
        assert store.depth(BOB).messages == 0  # BOB's part of the batch was refused too
        with pytest.raises(QuotaExceeded):
            store.enqueue([env(6, size=900)], NOW)
        # Duplicates cost nothing: a retry of stored messages passes a full quota.
        store.enqueue([env(3)], NOW)
        assert all(r.duplicate for r in store.enqueue([env(1), env(2), env(3)], NOW))
        assert store.statistics().quota_rejections == 2


def test_expired_messages_do_not_count_against_quota(tmp_path: Path) -> None:
    limits = StoreLimits(mailbox_max_messages=2)
    with Store.open(tmp_path / "n.db", limits=limits) as store:
        store.enqueue([env(1, expiry=NOW + 5), env(2, expiry=NOW + 5)], NOW)
        assert store.enqueue([env(3)], NOW + 5)[0].seq == 3


def test_payload_cap_and_validation_are_typed(store: Store) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        store.enqueue([env(1), env(2, size=5 * 1024 * 1024 + 1)], NOW)
    assert info.value.code is StatusCode.PAYLOAD_TOO_LARGE and info.value.index == 1
    with pytest.raises(EnvelopeExpired):
        store.enqueue([env(1, expiry=NOW)], NOW)
    bad = [
        Envelope(b"short", ALICE, NOW + HOUR, 1, b"x"),
        Envelope(bytes(16), b"short", NOW + HOUR, 1, b"x"),
        Envelope(bytes(16), ALICE, NOW + HOUR, 1, b""),
    ]
    for envelope in bad:
        with pytest.raises(InvalidRecord) as invalid:
            store.enqueue([envelope], NOW)
        assert invalid.value.code is StatusCode.INVALID_ARGUMENT
    assert store.depth(ALICE).messages == 0
    assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_group_commit_isolates_a_refused_batch(tmp_path: Path) -> None:
    limits = StoreLimits(mailbox_max_messages=2)
    with Store.open(tmp_path / "n.db", limits=limits) as store:
        outcomes = store.enqueue_many(
            [([env(1)], NOW), ([env(2), env(3)], NOW), ([env(4, BOB)], NOW), ([], NOW)]
        )
        assert isinstance(outcomes[0], list) and outcomes[0][0].seq == 1
        assert isinstance(outcomes[1], QuotaExceeded)
        assert isinstance(outcomes[2], list) and outcomes[2][0].seq == 1
        assert isinstance(outcomes[3], InvalidRecord)
        assert store.statistics().transactions == 1
        assert [m.seq for m in store.fetch(ALICE, now_ms=NOW).messages] == [1]


def test_an_acked_message_stays_a_duplicate_until_its_expiry(store: Store) -> None:
    store.enqueue([env(1), env(2)], NOW)
    assert store.ack(ALICE, up_to_seq=1) == 1
    assert store.ack(ALICE, up_to_seq=1) == 0
    (again,) = store.enqueue([env(1)], NOW + 1)
    assert (again.seq, again.duplicate) == (1, True)
    assert [m.seq for m in store.fetch(ALICE, now_ms=NOW + 1).messages] == [2]
    assert store.expire_messages(NOW + HOUR).tombstones == 1
    with pytest.raises(EnvelopeExpired):  # past expiry the envelope itself is refused
        store.enqueue([env(1)], NOW + HOUR)


def test_delivered_payload_pages_are_reused(store: Store) -> None:
    """Flash: an acked message's pages go back to the file for the next enqueue, so a
    mailbox that is emptied as fast as it fills does not grow the file by its payload
    (a WAL checkpoint then copies the same few pages again instead of new ones each
    time; bench/node_bench.py). What stays per message is its small tombstone."""
    n, size, cycles = 64, 1024, 20
    page_size = store.conn.execute("PRAGMA page_size").fetchone()[0]

    def cycle(k: int) -> None:
        store.enqueue([env(k * n + i, size=size) for i in range(1, n + 1)], NOW)
        assert store.ack(ALICE, up_to_seq=(k + 1) * n) == n

    cycle(0)
    before = store.conn.execute("PRAGMA page_count").fetchone()[0]
    for k in range(1, cycles + 1):
        cycle(k)
    grown = store.conn.execute("PRAGMA page_count").fetchone()[0] - before
    payload_pages = cycles * n * size // page_size
    assert grown * 4 <= payload_pages, (grown, payload_pages)


def test_a_refused_batch_undoes_the_purge_it_made_room_with(tmp_path: Path) -> None:
    """Refusal writes nothing, even when admitting an earlier mailbox of the batch
    purged that mailbox's expired mail first (no savepoint per batch any more)."""
    limits = StoreLimits(mailbox_max_messages=2)
    with Store.open(tmp_path / "n.db", limits=limits) as store:
        store.enqueue([env(1, expiry=NOW + 5), env(2, expiry=NOW + 5)], NOW)
        store.enqueue([env(3, BOB), env(4, BOB)], NOW)
        before = store.conn.execute("SELECT * FROM messages ORDER BY id").fetchall()
        with pytest.raises(QuotaExceeded):  # ALICE fits after her purge, BOB does not
            store.enqueue([env(5), env(6, BOB)], NOW + 5)
        assert store.conn.execute("SELECT * FROM messages ORDER BY id").fetchall() == before
        assert store.depth(ALICE).messages == 2
        assert store.enqueue([env(5)], NOW + 5)[0].seq == 3  # and the purge still works


def test_per_envelope_enqueue_runs_few_statements(store: Store) -> None:
    """CPU: a client's batch is stored envelope by envelope (each refused alone), so
    the statements per envelope are the store worker's cost per message. Four: the
    duplicate check, the mailbox row, the insert, the counters; the acceptance is read
    and note_sent written once per (recipient, sender) and transaction."""
    sender = SenderKey.local(BOB)
    store.enqueue([env(1, BOB)], NOW, sender=SenderKey.local(ALICE))  # ALICE accepts BOB
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    n = 32
    outcomes = store.enqueue_many([EnqueueBatch((env(i),), NOW, sender) for i in range(10, 10 + n)])
    store.conn.set_trace_callback(None)
    assert all(not isinstance(o, QuotaExceeded) for o in outcomes)
    assert store.depth(ALICE).messages == n
    # + BEGIN, COMMIT, the new mailbox row (ALICE had none), 2 acceptance reads, 1 write.
    assert len(statements) <= 4 * n + 6, len(statements) / n


def test_an_acceptance_written_in_a_group_counts_for_the_next_batch(tmp_path: Path) -> None:
    """Group commit: ALICE's batch to BOB makes her accept BOB; BOB's batch to her in the
    same transaction is then from an accepted sender (not held to the stranger pool),
    as it was when each batch read the table itself."""
    limits = StoreLimits(mailbox_max_messages=100)
    with Store.open(tmp_path / "n.db", limits=limits) as store:
        outcomes = store.enqueue_many(
            [
                EnqueueBatch((env(1, BOB),), NOW, SenderKey.local(ALICE)),
                EnqueueBatch(tuple(env(i) for i in range(2, 40)), NOW, SenderKey.local(BOB)),
            ]
        )
        assert all(not isinstance(o, QuotaExceeded) for o in outcomes), outcomes
        assert store.depth(ALICE).messages == 38
        assert store.depth(ALICE).stranger_messages == 0
        # A day later the same pair is refreshed once, not per batch.
        later = NOW + 86_400_000
        statements: list[str] = []
        store.conn.set_trace_callback(statements.append)
        store.enqueue_many(
            [
                EnqueueBatch(
                    (env(100 + i, BOB, expiry=later + HOUR),), later, SenderKey.local(ALICE)
                )
                for i in range(5)
            ]
        )
        store.conn.set_trace_callback(None)
        assert sum(s.startswith("INSERT INTO accepted") for s in statements) == 1
        (last,) = store.conn.execute(
            "SELECT last_ms FROM accepted WHERE recipient = ? AND peer = ?", (ALICE, BOB)
        ).fetchone()
        assert last == later

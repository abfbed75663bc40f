"""Mailbox fairness on a real SQLite file: who is accepted, how the pool and shares are
counted, and that every way out of a mailbox (ack, expiry, purge) gives the room back."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from qpc_node.errors import StatusCode
from qpc_node.store import Envelope, QuotaExceeded, Store, StoreLimits
from qpc_node.store.fairness import SenderKey
from qpc_node.store.mailbox import ACCEPT_REFRESH_MS
from qpc_node.store.schema import SCHEMA_VERSION, migrate

NOW = 1_700_000_000_000
HOUR = 3_600_000
DAY = 24 * HOUR
VICTIM = b"V" * 32
CONTACT = b"C" * 32
STRANGER = b"S" * 32
NODE = b"N" * 32

# 100 messages / 1 MiB: pool 10 messages, shares of 1 message each (a tenth of the pool).
LIMITS = StoreLimits(mailbox_max_messages=100, mailbox_max_bytes=1 << 20, max_payload_bytes=4096)

_ids = iter(range(1, 10**9))


def env(to: bytes = VICTIM, *, size: int = 100, expiry: int = NOW + HOUR) -> Envelope:
    n = next(_ids)
    return Envelope(n.to_bytes(16, "big"), to, expiry, 8, bytes([n % 251]) * size)


def local(user: bytes) -> SenderKey:
    return SenderKey.local(user)


def sybil(i: int) -> SenderKey:
    return SenderKey.local(i.to_bytes(4, "big") * 8)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "node.db", limits=LIMITS) as s:
        # The victim has written to its contact once: that is what "accepted" means.
        s.enqueue([env(CONTACT)], NOW, sender=local(VICTIM))
        yield s


def refused(store: Store, e: Envelope, sender: SenderKey, now: int = NOW) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as info:
        store.enqueue([e], now, sender=sender)
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED
    return info.value


def test_a_stranger_gets_its_share_and_a_contact_still_gets_in(store: Store) -> None:
    store.enqueue([env()], NOW, sender=local(STRANGER))
    exc = refused(store, env(), local(STRANGER))
    assert exc.reason == "stranger_share_used"
    assert "has not accepted" in str(exc)
    for _ in range(50):
        store.enqueue([env()], NOW, sender=local(CONTACT))
    depth = store.depth(VICTIM)
    assert (depth.messages, depth.stranger_messages) == (51, 1)
    stats = store.statistics()
    assert (stats.quota_rejections, stats.refused_stranger_share) == (1, 1)


def test_sybil_keys_fill_the_pool_not_the_mailbox(store: Store) -> None:
    for i in range(10):
        store.enqueue([env()], NOW, sender=sybil(i))
    assert refused(store, env(), sybil(10)).reason == "stranger_pool_full"
    # The contacts keep everything but the pool: 90 messages.
    for _ in range(90):
        store.enqueue([env()], NOW, sender=local(CONTACT))
    assert refused(store, env(), local(CONTACT)).reason == "mailbox_full"
    stats = store.statistics()
    assert (stats.refused_stranger_pool, stats.quota_rejections) == (1, 2)


def test_a_batch_past_the_share_is_refused_whole(store: Store) -> None:
    with pytest.raises(QuotaExceeded) as info:
        store.enqueue([env(), env()], NOW, sender=local(STRANGER))
    assert info.value.reason == "stranger_share_used" and info.value.requested == 2
    assert store.depth(VICTIM).messages == 0


def test_a_retry_is_a_duplicate_not_a_refusal(store: Store) -> None:
    first = env()
    (r,) = store.enqueue([first], NOW, sender=local(STRANGER))
    (again,) = store.enqueue([first], NOW, sender=local(STRANGER))
    assert (again.seq, again.duplicate) == (r.seq, True)


def test_ack_gives_the_room_back_and_forgets_the_sender(store: Store) -> None:
    store.enqueue([env()], NOW, sender=local(STRANGER))
    refused(store, env(), local(STRANGER))
    store.ack(VICTIM, up_to_seq=1)
    assert store.depth(VICTIM).stranger_messages == 0
    # The message (sender tag and ciphertext with it) is gone; its tombstone keeps
    # only what idempotency needs: no trace of who sent it.
    gone = store.conn.execute("SELECT count(*) FROM messages WHERE recipient = ?", (VICTIM,))
    assert gone.fetchone()[0] == 0
    # (In delivered_log until the log moves into delivered in bulk: store/mailbox.py.)
    tomb = store.conn.execute(
        "SELECT recipient, msg_id, seq, expiry_ms FROM delivered WHERE recipient = ?"
        " UNION ALL SELECT recipient, msg_id, seq, expiry_ms FROM delivered_log"
        " WHERE recipient = ?",
        (VICTIM, VICTIM),
    )
    assert [row[2] for row in tomb.fetchall()] == [1]  # (recipient, msg_id, seq, expiry)
    senders = "SELECT count(*) FROM mailbox_senders WHERE recipient = ?"
    assert store.conn.execute(senders, (VICTIM,)).fetchone()[0] == 0
    store.enqueue([env()], NOW, sender=local(STRANGER))  # room again
    # Acking by explicit seq releases too.
    store.ack(VICTIM, seqs=[2])
    assert store.depth(VICTIM).stranger_messages == 0


def test_expiry_and_purge_give_the_room_back(store: Store) -> None:
    for i in range(10):
        store.enqueue([env(expiry=NOW + 1000)], NOW, sender=sybil(i))
    refused(store, env(), sybil(99))
    # Purge on the full path: the next enqueue after expiry makes room itself.
    later = NOW + 2000
    store.enqueue([env(expiry=later + HOUR)], later, sender=sybil(99))
    assert store.depth(VICTIM).stranger_messages == 1
    for i in range(9):
        store.enqueue([env(expiry=later + 1000)], later, sender=sybil(i))
    sweep = store.expire_messages(later + 2000)
    assert sweep.expired == 9
    depth = store.depth(VICTIM)
    assert (depth.messages, depth.stranger_messages) == (1, 1)


def test_sending_to_someone_accepts_them(store: Store) -> None:
    store.enqueue([env()], NOW, sender=local(STRANGER))
    refused(store, env(), local(STRANGER))
    store.enqueue([env(STRANGER)], NOW, sender=local(VICTIM))  # the victim answers
    for _ in range(20):
        store.enqueue([env()], NOW, sender=local(STRANGER))
    # What it sent as a stranger still counts in the pool until acked; the rest does not.
    assert store.depth(VICTIM).stranger_messages == 1


def test_a_refused_send_accepts_nobody(store: Store) -> None:
    tiny = StoreLimits(mailbox_max_messages=1, max_payload_bytes=4096)
    store.limits = tiny
    store.enqueue([env(STRANGER)], NOW, sender=local(CONTACT))  # STRANGER's box is now full
    refused(store, env(STRANGER), local(VICTIM))
    store.limits = LIMITS
    store.enqueue([env()], NOW, sender=local(STRANGER))
    assert refused(store, env(), local(STRANGER)).reason == "stranger_share_used"


def test_acceptance_lapses_and_is_swept(store: Store) -> None:
    late = NOW + LIMITS.accepted_ttl_ms + 1
    store.enqueue([env(expiry=late + HOUR)], late, sender=local(CONTACT))
    assert refused(store, env(expiry=late + HOUR), local(CONTACT), late).reason == (
        "stranger_share_used"
    )
    # The victim's acceptance of its contact lapsed (the contact's fresh one of the
    # victim did not): the sweep forgets the old one.
    rows = "SELECT recipient FROM accepted ORDER BY recipient"
    assert store.conn.execute(rows).fetchall() == [(CONTACT,), (VICTIM,)]
    store.expire_messages(late)
    assert store.conn.execute(rows).fetchall() == [(CONTACT,)]


def test_acceptance_is_rewritten_at_most_daily(store: Store) -> None:
    def last() -> int:
        return int(
            store.conn.execute(
                "SELECT last_ms FROM accepted WHERE recipient = ? AND peer = ?", (VICTIM, CONTACT)
            ).fetchone()[0]
        )

    store.ack(CONTACT, up_to_seq=1)  # the fixture's message used the victim's share there
    store.enqueue([env(CONTACT, expiry=NOW + 2 * DAY)], NOW + HOUR, sender=local(VICTIM))
    assert last() == NOW
    store.ack(CONTACT, up_to_seq=2)
    store.enqueue(
        [env(CONTACT, expiry=NOW + 2 * DAY)], NOW + ACCEPT_REFRESH_MS, sender=local(VICTIM)
    )
    assert last() == NOW + ACCEPT_REFRESH_MS


def test_mail_to_yourself_is_accepted_only_from_your_session(store: Store) -> None:
    for _ in range(20):
        store.enqueue([env()], NOW, sender=local(VICTIM))
    store.enqueue([env()], NOW, sender=SenderKey.relayed(NODE, VICTIM))
    assert refused(store, env(), SenderKey.relayed(NODE, VICTIM)).reason == "stranger_share_used"


def test_relayed_mail_faces_the_same_rule(store: Store) -> None:
    # A relayed contact (declared origin accepted) is not bound by the pool.
    for _ in range(20):
        store.enqueue([env()], NOW, sender=SenderKey.relayed(NODE, CONTACT))
    # A relayed stranger has its own share, apart from the same origin sending locally.
    store.enqueue([env()], NOW, sender=SenderKey.relayed(NODE, STRANGER))
    refused(store, env(), SenderKey.relayed(NODE, STRANGER))
    store.enqueue([env()], NOW, sender=local(STRANGER))
    # Relayed strangers fill the same pool as local ones.
    for i in range(8):
        store.enqueue([env()], NOW, sender=SenderKey.relayed(NODE, sybil(i).origin))
    assert refused(store, env(), sybil(50)).reason == "stranger_pool_full"
    # Relaying a send does not make anyone accepted (only a local session's own sends).
    store.enqueue([env(STRANGER)], NOW, sender=SenderKey.relayed(NODE, VICTIM))
    assert refused(store, env(), local(STRANGER)).reason == "stranger_share_used"


def test_operator_path_is_bound_by_the_mailbox_quota_only(store: Store) -> None:
    for _ in range(30):
        store.enqueue([env()], NOW)
    assert store.depth(VICTIM).stranger_messages == 0


def test_counters_match_a_recount_after_random_traffic(store: Store) -> None:
    rng = random.Random(5)
    senders = [local(CONTACT), local(STRANGER), SenderKey.relayed(NODE, STRANGER)] + [
        sybil(i) for i in range(6)
    ]
    now = NOW
    for _ in range(400):
        now += rng.randrange(0, 400)
        op = rng.random()
        if op < 0.7:
            e = env(size=rng.randrange(1, 3000), expiry=now + rng.randrange(1, 5000))
            with contextlib.suppress(QuotaExceeded):
                store.enqueue([e], now, sender=rng.choice(senders))
        elif op < 0.85:
            head = store.depth(VICTIM).last_seq
            store.ack(VICTIM, seqs=[rng.randrange(1, head + 2) for _ in range(3)])
        else:
            store.expire_messages(now, max_rows=rng.randrange(1, 5))
        conn = store.conn
        live = "recipient = ?"  # every row left is unacked (acks here delete theirs)
        total = conn.execute(
            f"SELECT count(*), coalesce(sum(size), 0) FROM messages WHERE {live}", (VICTIM,)
        ).fetchone()
        strangers = conn.execute(
            f"SELECT count(*), coalesce(sum(size), 0) FROM messages WHERE {live} AND sender IS NOT NULL",
            (VICTIM,),
        ).fetchone()
        depth = store.depth(VICTIM)
        assert (depth.messages, depth.bytes) == total
        assert (depth.stranger_messages, depth.stranger_bytes) == strangers
        per = dict(
            conn.execute(
                f"SELECT sender, count(*) FROM messages WHERE {live} AND sender IS NOT NULL GROUP BY sender",
                (VICTIM,),
            ).fetchall()
        )
        rows = dict(
            conn.execute(
                "SELECT sender, depth FROM mailbox_senders WHERE recipient = ?", (VICTIM,)
            ).fetchall()
        )
        assert rows == per
        assert depth.stranger_messages <= 10 and max(per.values(), default=0) <= 1


def test_old_file_migrates_and_its_mail_counts_as_accepted(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(conn, target=3) == 3
        conn.execute("INSERT INTO mailboxes VALUES (?, 1, 1, 3)", (VICTIM,))
        conn.execute(
            "INSERT INTO messages (recipient, seq, msg_id, expiry_ms, hop_limit, enqueued_ms,"
            " size, ciphertext) VALUES (?, 1, ?, ?, 4, ?, 3, x'616263')",
            (VICTIM, bytes(16), NOW + HOUR, NOW),
        )
    finally:
        conn.close()
    with Store.open(path, limits=LIMITS) as store:
        assert store.statistics().schema_version == SCHEMA_VERSION >= 4
        depth = store.depth(VICTIM)
        assert (depth.messages, depth.stranger_messages) == (1, 0)
        store.enqueue([env()], NOW, sender=local(STRANGER))
        assert store.ack(VICTIM, up_to_seq=2) == 2
        assert store.depth(VICTIM) == store.depth(VICTIM).__class__(0, 0, 2)

"""kill -9 while 2,000 messages are being enqueued: every acknowledged enqueue survives,
exactly once (the store-level half of issue 4's crash requirement)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qpc_node.store import Envelope, Store, StoredMessage, mailbox

TOTAL = 2_000
KILL_AFTER = 500
NOW = 1_700_000_000_000
EXPIRY = NOW + 7 * 86_400_000
ALICE = b"A" * 32
REPO = Path(__file__).resolve().parents[2]

# The child prints "seq msg_id" only after enqueue() returned: that line is the ack.
CHILD = textwrap.dedent(
    """
    import sys, trio
    from qpc_node.store import AsyncStore, Envelope

    TOTAL, NOW, EXPIRY, TASKS = int(sys.argv[2]), {now}, {expiry}, 8

    def envelope(n):
        return Envelope(n.to_bytes(16, "big"), b"A" * 32, EXPIRY, 8, bytes([n % 251]) * 1024)

    async def main():
        store = await AsyncStore.open(sys.argv[1])
        async def sender(first):
            for n in range(first, TOTAL, TASKS):
                result = (await store.enqueue([envelope(n)], NOW))[0]
                sys.stdout.write(f"{{result.seq}} {{n}}\\n")
                sys.stdout.flush()
        async with trio.open_nursery() as nursery:
            for first in range(TASKS):
                nursery.start_soon(sender, first)
        await store.aclose()

    trio.run(main)
    """
).format(now=NOW, expiry=EXPIRY)


def envelope(n: int) -> Envelope:
    return Envelope(n.to_bytes(16, "big"), ALICE, EXPIRY, 8, bytes([n % 251]) * 1024)


@pytest.mark.timeout(120)
def test_acknowledged_enqueues_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), str(TOTAL)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    acked: dict[int, int] = {}  # n -> seq
    try:
        assert child.stdout is not None
        while len(acked) < KILL_AFTER:
            line = child.stdout.readline()
            if not line:
                break
            seq, n = map(int, line.split())
            acked[n] = seq
        child.send_signal(signal.SIGKILL)
        # Lines already in the pipe were acknowledged before the kill: count them too.
        for line in child.stdout:
            seq, n = map(int, line.split())
            acked[n] = seq
    finally:
        child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL, "the child finished before it was killed"
    assert KILL_AFTER <= len(acked) < TOTAL

    with Store.open(db) as store:
        page = store.fetch(ALICE, now_ms=NOW, limit=TOTAL + 1, max_bytes=1 << 30)
        stored = {int.from_bytes(m.envelope.msg_id, "big"): m for m in page.messages}
        print(f"acked {len(acked)}, stored {len(stored)}")
        assert len(stored) == len(page.messages)  # no msg_id twice
        for n, seq in acked.items():
            assert stored[n].seq == seq and stored[n].envelope == envelope(n)
        seqs = [m.seq for m in page.messages]
        assert seqs == sorted(set(seqs))
        # The client retries everything (it cannot know what was acked): no duplicates,
        # the acknowledged ones keep their seq, the rest are added once.
        results = store.enqueue([envelope(n) for n in range(TOTAL)], NOW)
        assert all(results[n].duplicate and results[n].seq == s for n, s in acked.items())
        assert store.depth(ALICE).messages == TOTAL
        assert len({r.seq for r in results}) == TOTAL


# Senders as above plus a reader that fetches and acks; "e seq n" after an enqueue
# returned, "a up_to" after an ack returned (both are acknowledgements to a client).
# argv[3]: tombstones per move from delivered_log into delivered (store/mailbox.py).
CHILD_ACKS = textwrap.dedent(
    """
    import sys, trio
    from qpc_node.store import AsyncStore, Envelope, mailbox

    TOTAL, NOW, EXPIRY, TASKS = int(sys.argv[2]), {now}, {expiry}, 4
    mailbox.MERGE_ROWS = int(sys.argv[3])
    A = b"A" * 32

    def envelope(n):
        return Envelope(n.to_bytes(16, "big"), A, EXPIRY, 8, bytes([n % 251]) * 1024)

    async def main():
        store = await AsyncStore.open(sys.argv[1])
        left = [TASKS]
        async def sender(first):
            for n in range(first, TOTAL, TASKS):
                result = (await store.enqueue([envelope(n)], NOW))[0]
                sys.stdout.write(f"e {{result.seq}} {{n}}\\n")
                sys.stdout.flush()
            left[0] -= 1
        async def reader():
            after = 0
            while left[0] or after < TOTAL:
                page = await store.fetch(A, now_ms=NOW, after_seq=after, limit=64)
                if not page.messages:
                    await trio.sleep(0.001)  # poll: the store has no wakeups here
                    continue
                after = page.messages[-1].seq
                await store.ack(A, up_to_seq=after)
                sys.stdout.write(f"a {{after}}\\n")
                sys.stdout.flush()
        async with trio.open_nursery() as nursery:
            for first in range(TASKS):
                nursery.start_soon(sender, first)
            nursery.start_soon(reader)
        await store.aclose()

    trio.run(main)
    """
).format(now=NOW, expiry=EXPIRY)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("merge_rows", [mailbox.MERGE_ROWS, 64], ids=["log", "merges"])
def test_acknowledged_enqueues_and_acks_survive_sigkill(tmp_path: Path, merge_rows: int) -> None:
    """An ack moves the mailbox's watermark in its own commit; the acked rows are
    deleted in a later write and their tombstones appended to a log, moved into
    ``delivered`` every ``merge_rows`` (with 64: many times before the kill). After
    kill -9 at any of those points every acknowledged enqueue is either still fetchable
    (not acked yet) or acked -- never fetched again, and a retry is a duplicate with its
    first seq -- never lost or delivered twice; every acknowledged ack stays done."""
    db = tmp_path / "node.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_ACKS, str(db), str(TOTAL), str(merge_rows)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    enqueued: dict[int, int] = {}  # n -> seq
    acked_to = 0

    def take(line: str) -> None:
        nonlocal acked_to
        kind, *rest = line.split()
        if kind == "e":
            seq, n = map(int, rest)
            enqueued[n] = seq
        else:
            acked_to = max(acked_to, int(rest[0]))

    try:
        assert child.stdout is not None
        while len(enqueued) < KILL_AFTER or not acked_to:
            line = child.stdout.readline()
            if not line:
                break
            take(line)
        child.send_signal(signal.SIGKILL)
        for line in child.stdout:
            take(line)
    finally:
        child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL, "the child finished before it was killed"
    assert KILL_AFTER <= len(enqueued) < TOTAL and acked_to > 0

    with Store.open(db) as store:
        page = store.fetch(ALICE, now_ms=NOW, limit=TOTAL + 1, max_bytes=1 << 30)
        stored = {int.from_bytes(m.envelope.msg_id, "big"): m for m in page.messages}
        print(f"enqueued {len(enqueued)}, acked up to {acked_to}, unacked {len(stored)}")
        assert all(m.seq > acked_to for m in page.messages)  # an ack that returned holds
        for n, seq in enqueued.items():
            if n in stored:
                assert stored[n].seq == seq and stored[n].envelope == envelope(n)
        results = store.enqueue([envelope(n) for n in range(TOTAL)], NOW)
        for n, seq in enqueued.items():  # stored or acked: a duplicate with its seq
            assert results[n].duplicate and results[n].seq == seq, n
        assert len({r.seq for r in results}) == TOTAL
        gone = TOTAL - store.depth(ALICE).messages  # acked (tombstones), all enqueued
        assert gone >= sum(1 for s in enqueued.values() if s <= acked_to)


# Enqueues and acks in one process, killed by itself right after the payload log's
# fdatasync of transaction argv[3] and before that transaction's COMMIT (store/
# payload_log.py): the window between the two syncs. Segments of 8 messages, so the
# kill also follows seals, deleted segments and compactions.
CHILD_LOG = textwrap.dedent(
    """
    import os, signal, sys
    from qpc_node.store import Envelope, Store, payload_log

    TOTAL, NOW, EXPIRY, KILL_AT = int(sys.argv[2]), {now}, {expiry}, int(sys.argv[3])
    payload_log.SEGMENT_BYTES = 8 * 1024
    payload_log.SLACK_BYTES = 8 * 1024
    A, B = b"A" * 32, b"B" * 32
    synced = [0]
    real_sync = payload_log.PayloadLog.sync

    def sync(self):
        staged = bool(self._staged)
        real_sync(self)
        synced[0] += staged
        if staged and synced[0] == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)

    payload_log.PayloadLog.sync = sync

    def envelope(n):
        to = B if n % 5 == 0 else A  # B's mail is never acked: its segments compact
        return Envelope(n.to_bytes(16, "big"), to, EXPIRY, 8, bytes([n % 251]) * 1024)

    store = Store.open(sys.argv[1])
    for first in range(0, TOTAL, 3):
        results = store.enqueue([envelope(n) for n in range(first, first + 3)], NOW)
        for n, r in zip(range(first, first + 3), results):
            sys.stdout.write(f"e {{r.seq}} {{n}}\\n")
        sys.stdout.flush()
        page = store.fetch(A, now_ms=NOW, limit=64)
        if page.messages:
            store.ack(A, up_to_seq=page.messages[-1].seq)
            sys.stdout.write(f"a {{page.messages[-1].seq}}\\n")
        sys.stdout.flush()
    """
).format(now=NOW, expiry=EXPIRY)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kill_at", [1, 37, 150])
def test_a_kill_between_the_payload_log_sync_and_the_commit(tmp_path: Path, kill_at: int) -> None:
    """The transaction whose payloads were synced but whose rows never committed is
    not acknowledged and leaves nothing visible; every acknowledged enqueue is stored
    with its bytes (or acked), every acknowledged ack holds; stray bytes and segments
    are cleaned up at open and the store carries on."""
    db = tmp_path / "node.db"
    total = 600
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", CHILD_LOG, str(db), str(total), str(kill_at)],
        capture_output=True,
        text=True,
        env=env,
        timeout=100,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    enqueued: dict[int, int] = {}
    acked_to = 0
    for line in run.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "e":
            enqueued[int(rest[1])] = int(rest[0])
        else:
            acked_to = max(acked_to, int(rest[0]))
    bob = b"B" * 32

    def envelope(n: int) -> Envelope:
        to = bob if n % 5 == 0 else ALICE
        return Envelope(n.to_bytes(16, "big"), to, EXPIRY, 8, bytes([n % 251]) * 1024)

    with Store.open(db) as store:
        stored: dict[int, StoredMessage] = {}
        for who in (ALICE, bob):
            page = store.fetch(who, now_ms=NOW, limit=total + 1, max_bytes=1 << 30)
            stored.update({int.from_bytes(m.envelope.msg_id, "big"): m for m in page.messages})
            if who == ALICE:
                assert all(m.seq > acked_to for m in page.messages)  # the ack holds
        for n, m in stored.items():
            assert m.envelope == envelope(n), n  # compacted or not, the bytes are intact
        # Unacknowledged and stored: only the batch in flight (committed, then killed in
        # the compaction that followed its seal, before it returned).
        assert len(set(stored) - set(enqueued)) <= 3
        for n, seq in enqueued.items():
            if n % 5 == 0 or seq > acked_to:
                assert stored[n].seq == seq, n  # acknowledged and not acked: here
        results = store.enqueue([envelope(n) for n in range(total)], NOW)
        for n, seq in enqueued.items():
            assert results[n].duplicate and results[n].seq == seq, n
        assert sum(not r.duplicate for r in results) == total - len(set(enqueued) | set(stored))
        for who in (ALICE, bob):  # every payload readable, the new ones too
            page = store.fetch(who, now_ms=NOW, limit=total + 1, max_bytes=1 << 30)
            assert all(
                m.envelope == envelope(int.from_bytes(m.envelope.msg_id, "big"))
                for m in page.messages
            )

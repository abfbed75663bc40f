"""Store benchmark: enqueue throughput and bytes written per 1 KiB message.

Prints figures and ratios against references measured in the same run:
batch-64 vs batch-1, synchronous=FULL (our policy) vs NORMAL, and the Trio facade's
group commit (64 concurrent callers, batch of 1 each) vs lone batch-1 calls.

"Bytes written" is the process's write() volume from /proc/self/io (``wchar``):
every WAL frame plus the checkpoint copy into the main file (the final checkpoint is
inside the window), i.e. what SQLite hands to the filesystem. File growth is printed
too. "node pattern": bench/node_bench.py's enqueue/fetch/ack pattern on the store alone,
``write_bytes`` per message split by phase (docs/performance.md).
``--floor``: where the node pattern's bytes go (variants, each in the same run) and
what SQLite alone writes per message with rows deleted at ack vs later, WAL vs rollback.
Run: .venv/bin/python bench/store_bench.py [--quick] [--floor]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from qpc_node.store import AsyncStore, Envelope, Store
from qpc_node.store.fairness import SenderKey
from qpc_node.store.sql import Synchronous
from qpc_node.store.store import EnqueueBatch

NOW = 1_700_000_000_000
EXPIRY = NOW + 86_400_000
PAYLOAD = 1024


def wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def envelopes(start: int, n: int, recipients: int = 16) -> list[Envelope]:
    return [
        Envelope(i.to_bytes(16, "big"), bytes([i % recipients]) * 32, EXPIRY, 8, b"\xab" * PAYLOAD)
        for i in range(start, start + n)
    ]


def files_size(db: Path) -> int:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))


class Result:
    def __init__(self, label: str, messages: int, seconds: float, written: int, grown: int):
        self.label = label
        self.msgs_per_s = messages / seconds
        self.bytes_per_msg = written / messages
        self.growth_per_msg = grown / messages

    def line(self) -> str:
        return (
            f"{self.label:<34} {self.msgs_per_s:>10,.0f} msg/s"
            f" {self.bytes_per_msg:>9,.0f} B written/msg {self.growth_per_msg:>7,.0f} B growth/msg"
        )


def run_sync(label: str, tmp: Path, batch: int, total: int, sync: Synchronous) -> Result:
    db = tmp / f"{label.replace(' ', '_')}.db"
    store = Store.open(db, synchronous=sync)
    warm = envelopes(10_000_000, 64)
    store.enqueue(warm, NOW)  # schema pages and mailbox rows exist before timing
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # growth baseline: empty WAL
    size0, w0, t0 = files_size(db), wchar(), time.perf_counter()
    for start in range(0, total, batch):
        store.enqueue(envelopes(start, batch), NOW)
    store.close()  # includes the TRUNCATE checkpoint: its writes belong to the cost
    seconds = time.perf_counter() - t0
    return Result(label, total, seconds, wchar() - w0, files_size(db) - size0)


def run_async(label: str, tmp: Path, callers: int, total: int) -> Result:
    db = tmp / "async.db"
    out: list[Result] = []

    async def main() -> None:
        store = await AsyncStore.open(db)
        await store.enqueue(envelopes(10_000_000, 64), NOW)
        await store.run(lambda s: s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        size0, w0, t0 = files_size(db), wchar(), time.perf_counter()

        async def caller(first: int) -> None:
            for i in range(first, total, callers):
                await store.enqueue(envelopes(i, 1), NOW)

        async with trio.open_nursery() as nursery:
            for first in range(callers):
                nursery.start_soon(caller, first)
        stats = store.statistics()
        await store.aclose()
        seconds = time.perf_counter() - t0
        out.append(Result(label, total, seconds, wchar() - w0, files_size(db) - size0))
        print(
            f"  (group commits: {stats.group_commits}, batches in groups:"
            f" {stats.grouped_batches}, largest group: {stats.largest_group},"
            f" transactions: {stats.store.transactions})"
        )

    trio.run(main)
    return out[0]


def lifecycle(tmp: Path, total: int) -> float:
    """Bytes written per message for enqueue (batch 64) + fetch + ack + sweep."""
    db = tmp / "life.db"
    store = Store.open(db)
    store.enqueue(envelopes(10_000_000, 64), NOW)
    store.checkpoint()
    w0 = wchar()
    for start in range(0, total, 64):
        store.enqueue(envelopes(start, 64), NOW)
    for r in range(16):
        recipient = bytes([r]) * 32
        page = store.fetch(recipient, now_ms=NOW, limit=total, max_bytes=1 << 30)
        store.ack(recipient, up_to_seq=page.last_seq)
    store.expire_messages(EXPIRY)
    store.close()
    return (wchar() - w0) / total


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def steady(tmp: Path, total: int, payload: int = 1280) -> dict[str, float]:
    """bench/node_bench.py's pattern on the store alone, for the flash split.

    4 recipients, each with an accepted sender; per round every sender stores 32
    envelopes one per batch (a client's Enqueue) and the 4 calls share one group
    commit; then each recipient fetches and acks (a transaction each). Expiries
    increase like a client's. ``write_bytes`` per message by phase (the final
    checkpoint is in "checkpoint"), CPU per message, and the file's growth.
    """
    db = tmp / "steady.db"
    store = Store.open(db)
    recipients = [bytes([0xA0 + i]) * 32 for i in range(4)]
    senders = [bytes([0xB0 + i]) * 32 for i in range(4)]
    for r, s in zip(recipients, senders, strict=True):  # r accepts s: r sent to s
        hello = Envelope(os.urandom(16), s, EXPIRY, 8, b"hi")
        store.enqueue([hello], NOW, sender=SenderKey.local(r))
    store.checkpoint()
    after = dict.fromkeys(recipients, 0)
    parts = {"enqueue": 0, "ack": 0, "checkpoint": 0}
    size0, cpu0, sent = files_size(db), time.process_time(), 0
    while sent < total:
        batches = [
            EnqueueBatch(
                (Envelope(os.urandom(16), r, EXPIRY + sent + i, 8, os.urandom(payload)),),
                NOW,
                SenderKey.local(s),
            )
            for r, s in zip(recipients, senders, strict=True)
            for i in range(32)
        ]
        w = proc_io()["write_bytes"]
        store.enqueue_many(batches)
        parts["enqueue"] += proc_io()["write_bytes"] - w
        sent += len(batches)
        for r in recipients:
            page = store.fetch(r, now_ms=NOW, after_seq=after[r], limit=256)
            after[r] = page.messages[-1].seq
            w = proc_io()["write_bytes"]
            store.ack(r, up_to_seq=after[r])
            parts["ack"] += proc_io()["write_bytes"] - w
    w = proc_io()["write_bytes"]
    store.checkpoint()
    parts["checkpoint"] += proc_io()["write_bytes"] - w
    cpu = time.process_time() - cpu0
    grown = files_size(db) - size0
    store.close()
    out = {k: v / sent for k, v in parts.items()}
    out["total"] = sum(parts.values()) / sent
    out["cpu_ms"] = cpu / sent * 1e3
    out["growth"] = grown / sent
    out["payload"] = payload
    return out


def _bare(tmp: Path, mode: str, rounds: int = 40, payload: int = 1280) -> float:
    """SQLite alone: write_bytes per message for rows of ``payload`` bytes in a rowid
    table with one (recipient, seq) index, synchronous=FULL, 4 recipients x 32 per
    enqueue commit, one ack commit per recipient; a checkpoint every 8 rounds (~SQLite's
    1,000-frame cadence). ``mode``: "wal" (ack deletes its rows), "wal-deferred" (ack
    writes a watermark row; the rows go in the next enqueue's commit, which reuses their
    pages), "rollback" / "rollback-deferred" (journal_mode=PERSIST)."""
    import sqlite3

    db = tmp / f"bare-{mode}.db"
    conn = sqlite3.connect(db, isolation_level=None)
    journal = "PERSIST" if mode.startswith("rollback") else "WAL"
    conn.execute(f"PRAGMA journal_mode = {journal}")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA secure_delete = FAST")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE m (id INTEGER PRIMARY KEY, r INTEGER, seq INTEGER, p BLOB)")
    conn.execute("CREATE UNIQUE INDEX m_seq ON m (r, seq)")
    conn.execute("CREATE TABLE wm (r INTEGER PRIMARY KEY, seq INTEGER)")
    deferred = mode.endswith("deferred")
    seq, acked = [0] * 4, [0] * 4
    written = counted = 0
    for rnd in range(rounds):
        w0 = proc_io()["write_bytes"]
        conn.execute("BEGIN")
        for r in range(4):
            if deferred:
                conn.execute("DELETE FROM m WHERE r = ? AND seq <= ?", (r, acked[r]))
            for _ in range(32):
                seq[r] += 1
                conn.execute(
                    "INSERT INTO m (r, seq, p) VALUES (?, ?, ?)", (r, seq[r], os.urandom(payload))
                )
        conn.execute("COMMIT")
        for r in range(4):
            conn.execute("BEGIN")
            if deferred:
                acked[r] = seq[r]
                conn.execute("INSERT OR REPLACE INTO wm VALUES (?, ?)", (r, seq[r]))
            else:
                conn.execute("DELETE FROM m WHERE r = ? AND seq <= ?", (r, seq[r]))
            conn.execute("COMMIT")
        if rnd % 8 == 7:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if rnd >= 8:  # past the file's growth
            written += proc_io()["write_bytes"] - w0
            counted += 128
    conn.close()
    return written / counted


def floor(tmp: Path, total: int) -> None:
    """Where the node pattern's bytes go and what SQLite's floor is (docs/performance.md).

    Attribution variants of :func:`steady`, each in its own file, same run: the
    tombstones' random-key writes taken off the file (a TEMP table shadows
    ``delivered``: no idempotency on disk, attribution only), 1,024-byte pages (a 1,280 B payload then
    lives in overflow pages, which SQLite does not write back once freed), both; then
    SQLite alone (:func:`_bare`)."""
    original = Store.open.__func__  # type: ignore[attr-defined]

    def variant(name: str) -> dict[str, float]:
        def opened(cls: type[Store], path: Path, **kw: object) -> Store:
            if "page1024" in name and not path.exists():
                import sqlite3

                c = sqlite3.connect(path)
                c.execute("PRAGMA page_size = 1024")
                c.execute("VACUUM")
                c.close()
            store: Store = original(cls, path, **kw)
            if "tombstones-off" in name:
                store.conn.execute("PRAGMA temp_store = MEMORY")
                store.conn.execute(
                    "CREATE TEMP TABLE delivered (recipient BLOB, msg_id BLOB, seq INTEGER,"
                    " expiry_ms INTEGER, PRIMARY KEY (recipient, msg_id)) WITHOUT ROWID"
                )
            return store

        Store.open = classmethod(opened)  # type: ignore[method-assign, assignment, arg-type]
        try:
            sub = tmp / name
            sub.mkdir()
            return steady(sub, total)
        finally:
            Store.open = classmethod(original)  # type: ignore[method-assign, assignment]

    print(f"floor: node pattern variants ({total} msgs each, 1,280 B payload), write_bytes B/msg")
    for name in ("this-tree", "tombstones-off", "page1024", "tombstones-off+page1024"):
        st = variant(name)
        print(
            f"  {name:<24} {st['total']:>7,.0f} = enqueue {st['enqueue']:,.0f} + ack"
            f" {st['ack']:,.0f} + checkpoint {st['checkpoint']:,.0f}"
            f" ({st['total'] / st['payload']:.2f} x payload)"
        )
    print("floor: SQLite alone (rows of 1,280 B, one index), write_bytes B/msg")
    for mode in ("wal", "wal-deferred", "rollback", "rollback-deferred"):
        b = _bare(tmp, mode)
        print(f"  {mode:<24} {b:>7,.0f} ({b / 1280:.2f} x payload)")


def _wal_pages(wal: Path, start: int) -> tuple[list[int], int]:
    """Page numbers of the WAL frames from byte ``start`` on, and the end."""
    data = wal.read_bytes()
    start = max(start, 32)
    frame = 24 + int.from_bytes(data[8:12], "big")
    pages = [
        int.from_bytes(data[off : off + 4], "big")
        for off in range(start, len(data) - frame + 1, frame)
    ]
    return pages, start + len(pages) * frame


def breakdown(tmp: Path, warm: int, total: int) -> None:
    """WAL frames per delivered message by B-tree and by phase (enqueue / ack commits).

    :func:`steady`'s pattern: ``warm`` messages first (tombstones and free pages as a
    running node has them), then the WAL is truncated and checkpoints stop, and the
    next ``total`` messages' frames are read back from the WAL file and mapped to the
    table or index owning each page (``dbstat``; a page on the freelist at the end is
    "(free)"). A frame is 4,096 + 24 B; the checkpoint later copies each distinct page
    once more (reported as its own line).
    """
    db = tmp / "breakdown.db"
    store = Store.open(db)
    conn = store.conn
    recipients = [bytes([0xA0 + i]) * 32 for i in range(4)]
    senders = [bytes([0xB0 + i]) * 32 for i in range(4)]
    for r, s in zip(recipients, senders, strict=True):
        hello = Envelope(os.urandom(16), s, EXPIRY, 8, b"hi")
        store.enqueue([hello], NOW, sender=SenderKey.local(r))
    after = dict.fromkeys(recipients, 0)
    phases: dict[str, dict[str, int]] = {"enqueue": {}, "ack": {}}
    seen: set[int] = set()

    def count(phase: str, got: list[int]) -> None:
        # Owners right after the commit: a freed page may belong to another tree later.
        owner = {int(p): str(n) for n, p in conn.execute("SELECT name, pageno FROM dbstat")}
        by = phases[phase]
        for p in got:
            name = owner.get(p, "(freelist)" if p != 1 else "(header)")
            by[name] = by.get(name, 0) + 1
        seen.update(got)

    wal = Path(str(db) + "-wal")
    sent = pos = counted = 0
    while sent < warm + total:
        if sent == warm:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            pos = 0
        batches = [
            EnqueueBatch(
                (Envelope(os.urandom(16), r, EXPIRY + sent + i, 8, os.urandom(1280)),),
                NOW,
                SenderKey.local(s),
            )
            for r, s in zip(recipients, senders, strict=True)
            for i in range(32)
        ]
        store.enqueue_many(batches)
        if sent >= warm:
            got, pos = _wal_pages(wal, pos)
            count("enqueue", got)
            counted += len(batches)
        sent += len(batches)
        for r in recipients:
            page = store.fetch(r, now_ms=NOW, after_seq=after[r], limit=256)
            if page.messages:
                after[r] = page.messages[-1].seq
            store.ack(r, up_to_seq=after[r])
            if sent > warm:
                got, pos = _wal_pages(wal, pos)
                count("ack", got)
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    frame = page_size + 24
    frames = sum(sum(v.values()) for v in phases.values())
    print(
        f"breakdown: {counted} msgs after {warm} warm-up; WAL frames per msg"
        f" {frames / counted:.2f} = {frames * frame / counted:,.0f} B; checkpoint copies"
        f" {len(seen) * page_size / counted:,.0f} B ({len(seen)} distinct pages of {page_size} B)"
    )
    for phase, by in phases.items():
        print(f"  {phase}: {sum(by.values()) * frame / counted:,.0f} B/msg")
        for name, n in sorted(by.items(), key=lambda kv: -kv[1]):
            print(f"    {name:<28} {n * frame / counted:>7,.0f} B/msg  ({n} frames)")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer messages (smoke run)")
    parser.add_argument(
        "--floor", action="store_true", help="only the flash attribution and SQLite's floor"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="only WAL frames per message by B-tree"
    )
    args = parser.parse_args()
    if args.breakdown:
        with tempfile.TemporaryDirectory(prefix="qpc-store-bench-") as d:
            breakdown(Path(d), 2048 if args.quick else 8192, 2048)
        return
    if args.floor:
        with tempfile.TemporaryDirectory(prefix="qpc-store-bench-") as d:
            floor(Path(d), 2048 if args.quick else 8192)
        return
    n1, n64 = (200, 1280) if args.quick else (1000, 6400)
    with tempfile.TemporaryDirectory(prefix="qpc-store-bench-") as d:
        tmp = Path(d)
        print(f"1 KiB messages, 16 recipients, sqlite on {tmp} (pid {os.getpid()})")
        runs: dict[str, Result] = {}
        plan: list[tuple[str, Callable[[], Result]]] = [
            ("FULL batch-1", lambda: run_sync("FULL batch-1", tmp, 1, n1, "FULL")),
            ("FULL batch-64", lambda: run_sync("FULL batch-64", tmp, 64, n64, "FULL")),
            ("NORMAL batch-1 (ref)", lambda: run_sync("NORMAL batch-1", tmp, 1, n1, "NORMAL")),
            ("NORMAL batch-64 (ref)", lambda: run_sync("NORMAL batch-64", tmp, 64, n64, "NORMAL")),
            ("async 64 callers x batch-1", lambda: run_async("async 64 callers", tmp, 64, n64)),
        ]
        for name, fn in plan:
            runs[name] = result = fn()
            result.label = name
            print(result.line())
        life = lifecycle(tmp, n64)
        st = steady(tmp, 2048 if args.quick else 8192)
        print(
            f"node pattern (4 x 32 per group commit, fetch + ack; {st['payload']:.0f} B payload):"
            f" write_bytes {st['total']:,.0f} B/msg = enqueue {st['enqueue']:,.0f}"
            f" + ack {st['ack']:,.0f} + checkpoint {st['checkpoint']:,.0f};"
            f" {st['total'] / st['payload']:.2f} x payload; CPU {st['cpu_ms']:.3f} ms/msg;"
            f" file growth {st['growth']:,.0f} B/msg"
        )
        b1, b64 = runs["FULL batch-1"], runs["FULL batch-64"]
        print(f"full lifecycle (enqueue b64 + fetch + ack + sweep): {life:,.0f} B written/msg")
        print("ratios:")
        print(f"  batch-64 / batch-1 throughput (FULL):  {b64.msgs_per_s / b1.msgs_per_s:6.1f}x")
        print(
            f"  batch-1 / batch-64 bytes per message:  {b1.bytes_per_msg / b64.bytes_per_msg:6.1f}x"
        )
        nb1 = runs["NORMAL batch-1 (ref)"]
        print(f"  FULL / NORMAL throughput, batch-1:     {b1.msgs_per_s / nb1.msgs_per_s:6.2f}x")
        grp = runs["async 64 callers x batch-1"]
        print(f"  group commit / lone batch-1 throughput:{grp.msgs_per_s / b1.msgs_per_s:6.1f}x")


if __name__ == "__main__":
    main()

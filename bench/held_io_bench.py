"""Held-envelope I/O on a real node's store: bytes written per held 1 KiB envelope.

Routers keep their store on raw flash; every page SQLite writes wears it. This
bench runs the store-and-forward path's real store functions on a real SQLite
file with the node's settings (WAL, ``synchronous=FULL``) and counts what one
held 1 KiB envelope costs in writes, over its whole life here:

    hold (RelayEnqueue from a neighbour, no route)  -> RELAY_HELD
    release (a route appeared)                      -> custody toward the next hop
    forwarded (the next hop acknowledged the batch) -> custody row deleted
    receipt (the home's DELIVERED came back)        -> purge, seen-row tombstone
    expiry sweep (tombstone and trail past expiry)  -> gone

and "hold alone" (the first step and the checkpoint of what it wrote).

Grouping as the node really does it (qpc_node/federation/custody.py,
qpc_node/storefwd/forward.py):

- ``one per call``: one envelope per transaction at every step (sparse traffic:
  a neighbour's RelayEnqueue carries one envelope, a release pass finds one, a
  receipt RPC carries one).
- ``grouped``: a neighbour's drainer sends ``relay_batch`` (64) envelopes per
  RelayEnqueue, one hold transaction each; a release pass moves one recipient's
  envelopes in one transaction; the drainer ends custody for a batch of 64 at
  once; receipts arrive ``MAX_RECEIPTS`` per RPC and are applied as
  :meth:`~qpc_node.storefwd.forward.StoreForward.on_receipts` applies them.

Reference in the same run: a 1 KiB envelope stored in a local mailbox through
the existing path (``Store.enqueue_many``, one per call and 64 per call), and the
relay custody path with a route (accept, forward, receipt).

Counters (/proc/self/io): ``wchar`` is what SQLite handed to write() (WAL frames
plus the checkpoint's copy into the main file: a checkpoint at the end of each
scenario is inside the window); ``write_bytes`` is what the kernel accounted to
the block device for this process (page-granular). The store starts with
background state (tombstones of earlier traffic, other recipients' held mail) so
index pages are not all fresh.

Run: .venv/bin/python bench/held_io_bench.py [--quick] [--page-size N]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qpc_node.store import Envelope, Store
from qpc_node.store.federation import (
    RelayItem,
    RelayQueueLimits,
    relay_accept,
    relay_done,
    relay_due,
    relay_expire,
)
from qpc_node.store.held import (
    HoldItem,
    apply_receipts,
    held_expire,
    hold_many,
    release,
)
from qpc_node.store.store import EnqueueBatch
from qpc_node.storefwd.held import HoldPolicy
from qpc_node.storefwd.receipts import MAX_RECEIPTS

NOW = 1_700_000_000_000
EXPIRY = NOW + 86_400_000
LATER = EXPIRY + 3_600_000  # the background's: the measured sweep leaves it alone
PAYLOAD = 1024
RELAY_BATCH = 64  # FederationLimits.relay_batch
RECIPIENTS = 4
NEIGHBOUR = b"\x0a" * 32  # where the held envelopes come from
HOP = b"\x0b" * 32  # the next hop once a route appears
ORIGIN_NODE = b"\x0c" * 32
POLICY = HoldPolicy()
QUEUE = RelayQueueLimits()


def io_counters() -> tuple[int, int]:
    got: dict[str, int] = {}
    with open("/proc/self/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            got[key] = int(value)
    return got["wchar"], got["write_bytes"]


@dataclass(slots=True)
class Tally:
    wchar: int = 0
    device: int = 0

    def add(self, fn: Callable[[], object]) -> None:
        w0, d0 = io_counters()
        fn()
        w1, d1 = io_counters()
        self.wchar += w1 - w0
        self.device += d1 - d0


class Bench:
    def __init__(self, root: Path, page_size: int | None, background: int, seed: int) -> None:
        self.rng = random.Random(seed)
        path = root / "node.db"
        if page_size is not None:
            raw = sqlite3.connect(path)
            raw.execute(f"PRAGMA page_size = {page_size:d}")
            raw.execute("VACUUM")
            raw.close()
        self.store = Store.open(path)  # the node's settings: WAL, synchronous=FULL
        self._background(background)

    def close(self) -> None:
        self.store.close()

    def ids(self, n: int) -> list[bytes]:
        return [self.rng.randbytes(16) for _ in range(n)]

    def envelope(self, msg_id: bytes, i: int, expiry_ms: int = EXPIRY) -> Envelope:
        # Expiries follow arrival (senders set now + a fixed lifetime).
        recipient = bytes([i % RECIPIENTS + 1]) * 32
        return Envelope(msg_id, recipient, expiry_ms + i, 8, self.rng.randbytes(PAYLOAD))

    def _background(self, n: int) -> None:
        """Earlier traffic: ``n`` delivered tombstones with trails, and some mail
        held for other recipients; mailbox rows of other users."""
        self.store.conn.execute("PRAGMA synchronous = OFF")  # setting up, not measured
        ids = self.ids(n)
        for start in range(0, n, 256):
            items = [
                HoldItem(self.envelope(m, i, LATER), None, ORIGIN_NODE, NEIGHBOUR, 1)
                for i, m in enumerate(ids[start : start + 256])
            ]
            hold_many(self.store, items, NOW, POLICY)
        apply_receipts(self.store, [(m, HOP, None) for m in ids])
        others = [
            HoldItem(
                Envelope(m, b"\xee" * 32, LATER, 8, self.rng.randbytes(PAYLOAD)),
                None,
                ORIGIN_NODE,
                NEIGHBOUR,
                1,
            )
            for m in self.ids(n // 20)
        ]
        hold_many(self.store, others, NOW, POLICY)
        mail = [self.envelope(m, i, LATER) for i, m in enumerate(self.ids(n // 10))]
        self.store.enqueue_many(
            [EnqueueBatch(tuple(mail[i : i + 64]), NOW) for i in range(0, len(mail), 64)]
        )
        self.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.store.conn.execute("PRAGMA synchronous = FULL")  # the node's setting

    def checkpoint(self) -> None:
        self.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ------------------------------------------------------------- the held path
    def held_life(self, n: int, grouped: bool, hold_only: bool) -> dict[str, Tally]:
        ids = self.ids(n)
        envs = [self.envelope(m, i) for i, m in enumerate(ids)]
        t: dict[str, Tally] = {
            k: Tally()
            for k in ("hold", "release", "forwarded", "receipt", "expiry sweep", "checkpoint")
        }
        step = RELAY_BATCH if grouped else 1
        for s in range(0, n, step):
            items = [HoldItem(e, None, ORIGIN_NODE, NEIGHBOUR, 1) for e in envs[s : s + step]]
            t["hold"].add(lambda items=items: hold_many(self.store, items, NOW, POLICY))
        if not hold_only:
            later = NOW + 1000
            for r in range(RECIPIENTS):
                recipient = bytes([r + 1]) * 32
                while True:
                    box: list[int] = []

                    def one(recipient: bytes = recipient, box: list[int] = box) -> None:
                        got = release(
                            self.store,
                            recipient,
                            HOP,
                            later,
                            max_per_hop=QUEUE.max_per_hop,
                            max_rows=256 if grouped else 1,
                        )
                        box.append(got.left)

                    t["release"].add(one)
                    if box[0] == 0:
                        break
            while rows := relay_due(self.store, HOP, later, RELAY_BATCH if grouped else 1):
                ids_done = [(q.id, q.envelope.msg_id) for q in rows]
                t["forwarded"].add(lambda ids_done=ids_done: relay_done(self.store, ids_done))
            per_rpc = MAX_RECEIPTS if grouped else 1
            for s in range(0, n, per_rpc):
                batch = [(m, HOP, None) for m in ids[s : s + per_rpc]]
                t["receipt"].add(lambda batch=batch: apply_receipts(self.store, batch))
            t["checkpoint"].add(self.checkpoint)
            # Past expiry: the sweeps drop tombstones and trails (10,000 rows a sweep).
            t["expiry sweep"].add(lambda: held_expire(self.store, EXPIRY + n))
            t["expiry sweep"].add(lambda: relay_expire(self.store, EXPIRY + n))
            t["expiry sweep"].add(self.checkpoint)
        else:
            t["checkpoint"].add(self.checkpoint)
        return t

    # ------------------------------------------------------------- references
    def mailbox(self, n: int, grouped: bool) -> Tally:
        envs = [self.envelope(m, i) for i, m in enumerate(self.ids(n))]
        t = Tally()
        step = RELAY_BATCH if grouped else 1
        for s in range(0, n, step):
            batch = [EnqueueBatch((e,), NOW) for e in envs[s : s + step]]
            t.add(lambda batch=batch: self.store.enqueue_many(batch))
        t.add(self.checkpoint)
        return t

    def relayed(self, n: int, grouped: bool) -> Tally:
        """With a route: accept into custody, forwarded, receipt, sweep."""
        ids = self.ids(n)
        envs = [self.envelope(m, i) for i, m in enumerate(ids)]
        t = Tally()
        step = RELAY_BATCH if grouped else 1
        for s in range(0, n, step):
            items = [RelayItem(HOP, NEIGHBOUR, e, None, ORIGIN_NODE) for e in envs[s : s + step]]
            t.add(lambda items=items: relay_accept(self.store, items, NOW, QUEUE))
        while rows := relay_due(self.store, HOP, NOW, step):
            ids_done = [(q.id, q.envelope.msg_id) for q in rows]
            t.add(lambda ids_done=ids_done: relay_done(self.store, ids_done))
        per_rpc = MAX_RECEIPTS if grouped else 1
        for s in range(0, n, per_rpc):
            batch = [(m, HOP, None) for m in ids[s : s + per_rpc]]
            t.add(lambda batch=batch: apply_receipts(self.store, batch))
        t.add(self.checkpoint)
        t.add(lambda: relay_expire(self.store, EXPIRY + n))
        t.add(self.checkpoint)
        return t


def fresh(args: argparse.Namespace, fn: Callable[[Bench], object]) -> object:
    with tempfile.TemporaryDirectory(prefix="qpc-heldio-") as d:
        b = Bench(Path(d), args.page_size, args.background, args.seed)
        try:
            return fn(b)
        finally:
            b.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer envelopes (a smoke run)")
    p.add_argument("-n", type=int, default=256, help="envelopes per scenario")
    p.add_argument(
        "--page-size", type=int, default=None, help="page size of the file (default: the store's)"
    )
    p.add_argument("--background", type=int, default=4000, help="tombstones already stored")
    p.add_argument("--seed", type=int, default=13)
    args = p.parse_args()
    n = 64 if args.quick else args.n
    print(
        f"held 1 KiB envelopes: n={n} per scenario, background={args.background},"
        f" synchronous=FULL, page_size={args.page_size or 'the store default'}"
    )
    print(f"{'scenario':<40} {'wchar B/env':>12} {'device B/env':>13}")
    out: dict[str, float] = {}

    def row(label: str, wchar: int, device: int, count: int) -> None:
        out[label] = wchar / count
        print(f"{label:<40} {wchar / count:>12,.0f} {device / count:>13,.0f}")

    for grouped in (False, True):
        mode = "grouped" if grouped else "one per call"
        life = fresh(args, lambda b, g=grouped: b.held_life(n, g, hold_only=False))
        assert isinstance(life, dict)
        for k, v in life.items():
            row(f"  held life {mode}: {k}", v.wchar, v.device, n)
        row(
            f"held life ({mode})",
            sum(v.wchar for v in life.values()),
            sum(v.device for v in life.values()),
            n,
        )
        alone = fresh(args, lambda b, g=grouped: b.held_life(n, g, hold_only=True))
        assert isinstance(alone, dict)
        row(
            f"hold alone ({mode})",
            sum(v.wchar for v in alone.values()),
            sum(v.device for v in alone.values()),
            n,
        )
        mb = fresh(args, lambda b, g=grouped: b.mailbox(n, g))
        assert isinstance(mb, Tally)
        row(f"ref: mailbox store ({mode})", mb.wchar, mb.device, n)
        rl = fresh(args, lambda b, g=grouped: b.relayed(n, g))
        assert isinstance(rl, Tally)
        row(f"ref: relayed with a route ({mode})", rl.wchar, rl.device, n)
    for mode in ("one per call", "grouped"):
        print(
            f"ratio ({mode}): held life / mailbox store = "
            f"{out[f'held life ({mode})'] / out[f'ref: mailbox store ({mode})']:.2f}, "
            f"hold alone / mailbox store = "
            f"{out[f'hold alone ({mode})'] / out[f'ref: mailbox store ({mode})']:.2f}"
        )
    print(
        f"held_bytes_per_env one={out['held life (one per call)']:.0f}"
        f" grouped={out['held life (grouped)']:.0f}"
        f" hold_alone_one={out['hold alone (one per call)']:.0f}"
        f" hold_alone_grouped={out['hold alone (grouped)']:.0f}"
        f" mailbox_one={out['ref: mailbox store (one per call)']:.0f}"
        f" mailbox_grouped={out['ref: mailbox store (grouped)']:.0f}"
    )


if __name__ == "__main__":
    main()

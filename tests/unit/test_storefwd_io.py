"""Flash writes of the held path: B-tree pages each step's commit writes, counted
as WAL frames (bench/held_io_bench.py measures the bytes on a larger store).

Routers write to raw flash; every index or row of its own that an envelope
writes is one more page per commit. These tests pin the page counts the schema
was trimmed to, and that the receipts of one neighbour's call are one commit."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, cast

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from qpc_node.federation.routes import NoRoute
from qpc_node.store import AsyncStore, Envelope, Store
from qpc_node.store.federation import RelayItem, RelayQueueLimits, relay_accept
from qpc_node.store.held import (
    HoldItem,
    apply_receipt,
    custody_toward,
    held_for,
    hold_many,
    release,
    reroute,
)
from qpc_node.store.store import EnqueueBatch, EnqueueOutcome
from qpc_node.storefwd import receipts as rc
from qpc_node.storefwd.forward import StoreForward
from qpc_node.storefwd.held import HoldPolicy

NOW = 1_800_000_000_000
DAY = 86_400_000
USER = b"\x01" * 32
PREV, HOP, ORIGIN_NODE = b"\xbb" * 32, b"\xcc" * 32, b"\xd1" * 32


# The B-trees one held / relayed envelope writes (its row and each index entry is a
# page per commit): no trail row of its own (its way back is the seen row's peer),
# no expiry index on held (the origin-node index serves the sweep), no msg_id index
# on held (the seen row points at the held row).
HOLD_WRITES = {
    "held",
    "held_by_recipient",
    "held_by_origin_node",
    "relay_seen",
    "relay_seen_by_expiry",
}
RELAY_WRITES = {
    "relay_queue",
    "relay_queue_by_msg_id",
    "relay_queue_by_hop",
    "relay_queue_by_origin",
    "relay_queue_by_expiry",
    "relay_seen",
    "relay_seen_by_expiry",
}


def env(recipient: bytes = USER) -> Envelope:
    return Envelope(os.urandom(16), recipient, NOW + DAY, 6, os.urandom(1024))


def wal_frames(path: Path, page_size: int) -> list[tuple[int, bool]]:
    """(page number, ends a commit) of each frame in the WAL since it was truncated."""
    wal = path.with_name(path.name + "-wal")
    data = wal.read_bytes() if wal.exists() else b""
    frames = []
    for at in range(32, len(data) - 24 - page_size + 1, 24 + page_size):
        pgno = int.from_bytes(data[at : at + 4], "big")
        frames.append((pgno, int.from_bytes(data[at + 4 : at + 8], "big") != 0))
    return frames


def warm_store(path: Path) -> tuple[Store, int]:
    """A store with earlier traffic (tables of several pages), WAL truncated."""
    s = Store.open(path)
    background = [env(bytes([i % 7 + 2]) * 32) for i in range(400)]
    for i in range(0, 400, 100):
        hold_many(
            s,
            [HoldItem(e, None, ORIGIN_NODE, PREV, 1) for e in background[i : i + 100]],
            NOW,
            HoldPolicy(),
        )
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return s, int(s.conn.execute("PRAGMA page_size").fetchone()[0])


def btrees_written(path: Path, s: Store, page_size: int, fn: Any) -> set[str]:
    """The tables and indexes whose pages ``fn``'s commits wrote (sqlite_schema:
    page 1, rewritten when the file grows, left out)."""
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    fn()
    pages = sorted({p for p, _ in wal_frames(path, page_size)})
    names = {
        str(r[0])
        for r in s.conn.execute(
            f"SELECT DISTINCT name FROM dbstat WHERE pageno IN ({','.join('?' * len(pages))})",
            pages,
        )
    }
    return names - {"sqlite_schema"}


def test_holding_one_envelope_writes_its_receipt_way_back_in_the_seen_row(
    tmp_path: Path,
) -> None:
    """Fails before: relay_trail, relay_trail_by_expiry, held_by_expiry and held's
    msg_id index were written too (four more pages per envelope and commit)."""
    path = tmp_path / "node.db"
    s, page = warm_store(path)
    with s:
        envs = [env() for _ in range(8)]
        written: set[str] = set()
        for e in envs:
            written |= btrees_written(
                path,
                s,
                page,
                lambda e=e: hold_many(
                    s, [HoldItem(e, None, ORIGIN_NODE, PREV, 1)], NOW, HoldPolicy()
                ),
            )
        assert written == HOLD_WRITES, written
        # The receipt still goes back to the node the envelope came from.
        assert apply_receipt(s, envs[0].msg_id, HOP).peers == (PREV,)
        assert apply_receipt(s, envs[1].msg_id, PREV).peers == ()
        # Released envelopes keep theirs too (the seen row outlives the held row).
        release(s, USER, HOP, NOW, max_per_hop=1000)
        assert apply_receipt(s, envs[2].msg_id, HOP).peers == (PREV,)


def test_relaying_one_envelope_writes_no_trail_row(tmp_path: Path) -> None:
    """Fails before: relay_trail and relay_trail_by_expiry were written too."""
    path = tmp_path / "node.db"
    s, page = warm_store(path)
    with s:
        envs = [env() for _ in range(8)]
        written: set[str] = set()
        for e in envs:
            written |= btrees_written(
                path,
                s,
                page,
                lambda e=e: relay_accept(
                    s, [RelayItem(HOP, PREV, e, None, ORIGIN_NODE)], NOW, RelayQueueLimits()
                ),
            )
        assert written == RELAY_WRITES, written
        assert apply_receipt(s, envs[0].msg_id, HOP).peers == (PREV,)


class _Custody:
    """The custody hooks on_receipts uses: what it purged, per next hop."""

    def __init__(self) -> None:
        self.less: dict[bytes, int] = {}

    def queued_more(self, hop: bytes, n: int) -> None:
        raise AssertionError("nothing is released here")

    def queued_less(self, hop: bytes, n: int) -> None:
        self.less[hop] = self.less.get(hop, 0) + n

    def down_since(self, hop: bytes) -> float | None:
        return None

    def hops_with_custody(self) -> list[bytes]:
        return []

    async def store_local(self, batches: list[EnqueueBatch]) -> list[EnqueueOutcome]:
        raise AssertionError("nothing is stored locally here")


async def test_the_receipts_of_one_call_are_applied_in_one_commit(tmp_path: Path) -> None:
    """32 receipts in one Receipt call: one commit, not one per receipt (fails
    before: 32 commits, each rewriting seen and held pages)."""
    k = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"heldio-home").digest())
    pub = k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    home = hashlib.sha256(pub).digest()
    path = tmp_path / "node.db"
    s, page = warm_store(path)
    envs = [env() for _ in range(32)]
    hold_many(s, [HoldItem(e, None, ORIGIN_NODE, PREV, 1) for e in envs], NOW, HoldPolicy())
    s.close()
    store = await AsyncStore.open(path)
    try:
        custody = _Custody()
        fwd = StoreForward(
            b"\xaa" * 32,
            store,
            lambda _u: NoRoute(),
            cast(Any, None),  # no nursery: receipts are queued, nothing is sent
            HoldPolicy(),
            wall_ms=lambda: NOW,
            sign=None,
            public_key=None,
            home_of=lambda u: home if u == USER else None,
            custody=custody,
            max_per_hop=lambda: 1000,
            call_timeout=lambda: 5.0,
        )
        await store.run(lambda st: st.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        receipts = [rc.make_receipt(k.sign, pub, e.msg_id, USER, NOW) for e in envs]
        assert await fwd.on_receipts(HOP, receipts) == 32
        assert fwd.c_r_applied == 32 and fwd.c_purged == 32
        commits = sum(c for _, c in wal_frames(path, page))
        assert commits == 1, commits
        # Applied: a second call finds them delivered already (and writes nothing).
        assert await fwd.on_receipts(HOP, receipts[:4]) == 4
        assert fwd.c_r_repeated == 4
        await trio.lowlevel.checkpoint()
    finally:
        await store.aclose()


def test_a_receipt_finds_the_held_row_through_the_seen_row_never_a_reused_id(
    tmp_path: Path,
) -> None:
    """held has no msg_id index: a receipt reaches the held row through the seen
    row's pointer, checked against msg_id. A released envelope's stale pointer may
    name an id SQLite hands out again (the largest id was deleted): its late
    receipt must not purge the envelope that now has that id."""
    with Store.open(tmp_path / "node.db") as s:
        a, b = env(), env()
        hold_many(s, [HoldItem(a, None, ORIGIN_NODE, PREV, 1)], NOW, HoldPolicy())
        assert release(s, USER, HOP, NOW, max_per_hop=1000).moved == 1
        hold_many(s, [HoldItem(b, None, ORIGIN_NODE, PREV, 1)], NOW, HoldPolicy())
        ids = [r[0] for r in s.conn.execute("SELECT held FROM relay_seen ORDER BY held")]
        assert ids[0] == ids[1]  # b reused a's id: a's pointer is stale
        got = apply_receipt(s, a.msg_id, HOP)
        assert (got.purged_held, got.purged_queued) == (0, {HOP: 1})
        assert [h.envelope.msg_id for h in held_for(s, USER, NOW)] == [b.msg_id]
        assert apply_receipt(s, b.msg_id, HOP).purged_held == 1
        assert held_for(s, USER, NOW) == []
        # Custody held again (re-route) gets a pointer of its own.
        c = env()
        relay_accept(s, [RelayItem(HOP, PREV, c, None, ORIGIN_NODE)], NOW, RelayQueueLimits())
        (row,) = custody_toward(s, HOP)
        assert reroute(s, [], [(row.id, row.msg_id)], NOW, 1) == (0, 1)
        assert reroute(s, [], [(row.id, row.msg_id)], NOW, 1) == (0, 0)  # gone: skipped
        assert apply_receipt(s, c.msg_id, HOP).purged_held == 1

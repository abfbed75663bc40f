"""Numbered, forward-only schema migrations tracked in ``PRAGMA user_version``.

Each migration runs in its own ``BEGIN IMMEDIATE`` transaction together with the
``user_version`` bump, so a crash mid-upgrade leaves the file at the previous version
and the next start simply retries. A file whose version is higher than ours was written
by a newer qpc: we refuse it (:class:`SchemaTooNew`) instead of guessing. Never edit a
released migration; append a new one.
"""

from __future__ import annotations

import sqlite3

from qpc_node.store.errors import SchemaTooNew
from qpc_node.store.sql import transaction

# Statements, not scripts: ``executescript`` would COMMIT the open transaction first.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: node state and mailboxes.
    (
        """CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value BLOB NOT NULL
        ) WITHOUT ROWID""",
        # One row per recipient ever seen: keeps last_seq monotonic even when empty,
        # and depth/bytes so quota checks are O(1).
        """CREATE TABLE mailboxes (
            recipient BLOB PRIMARY KEY,
            last_seq INTEGER NOT NULL DEFAULT 0,
            depth INTEGER NOT NULL DEFAULT 0,
            bytes INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        # ciphertext becomes NULL on ack: the row stays as a tombstone until expiry so
        # a late retry of an already delivered msg_id is still recognised.
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            recipient BLOB NOT NULL REFERENCES mailboxes(recipient),
            seq INTEGER NOT NULL,
            msg_id BLOB NOT NULL,
            expiry_ms INTEGER NOT NULL,
            hop_limit INTEGER NOT NULL,
            enqueued_ms INTEGER NOT NULL,
            size INTEGER NOT NULL,
            ciphertext BLOB
        )""",
        "CREATE UNIQUE INDEX messages_by_seq ON messages(recipient, seq)",
        "CREATE UNIQUE INDEX messages_by_msg_id ON messages(recipient, msg_id)",
        "CREATE INDEX messages_by_expiry ON messages(expiry_ms)",
    ),
    # 2: KeyPackage directory.
    (
        """CREATE TABLE keypackages (
            id INTEGER PRIMARY KEY,
            identity BLOB NOT NULL,
            ciphersuite INTEGER NOT NULL,
            last_resort INTEGER NOT NULL CHECK (last_resort IN (0, 1)),
            not_after_ms INTEGER NOT NULL,
            uploaded_ms INTEGER NOT NULL,
            digest BLOB NOT NULL,
            data BLOB NOT NULL
        )""",
        "CREATE UNIQUE INDEX keypackages_by_digest ON keypackages(identity, digest)",
        "CREATE INDEX keypackages_by_identity ON keypackages(identity, last_resort, id)",
        "CREATE INDEX keypackages_by_expiry ON keypackages(not_after_ms)",
    ),
    # 3: audit trail.
    (
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            ts_ms INTEGER NOT NULL,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            detail TEXT NOT NULL
        )""",
        "CREATE INDEX audit_by_ts ON audit(ts_ms)",
        "CREATE INDEX audit_by_kind ON audit(kind, id)",
    ),
    # 4: mailbox fairness (store/fairness.py). Rows stored before it count as mail from
    # accepted senders (sender NULL), which is what they were treated as.
    (
        # Set only while a message from a stranger is unacked: whose share to credit
        # when it is acked or expires (NULL for accepted senders: nothing is recorded).
        "ALTER TABLE messages ADD COLUMN sender BLOB",
        "ALTER TABLE mailboxes ADD COLUMN stranger_depth INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE mailboxes ADD COLUMN stranger_bytes INTEGER NOT NULL DEFAULT 0",
        # Per-stranger counters so the share check is O(1); a row lives while it is > 0.
        """CREATE TABLE mailbox_senders (
            recipient BLOB NOT NULL,
            sender BLOB NOT NULL,
            depth INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            PRIMARY KEY (recipient, sender)
        ) WITHOUT ROWID""",
        # recipient accepts mail from peer: recipient sent to peer, last at last_ms.
        """CREATE TABLE accepted (
            recipient BLOB NOT NULL,
            peer BLOB NOT NULL,
            last_ms INTEGER NOT NULL,
            PRIMARY KEY (recipient, peer)
        ) WITHOUT ROWID""",
        "CREATE INDEX accepted_by_age ON accepted(last_ms)",
    ),
    # 5: federation (store/federation.py): trust pins, relay custody queue, relay seen-set.
    (
        # Mesh-mode trust on first use: node id -> its key and whether we trust it.
        # state 'refused': seen presenting a changed key; refused until trust() (qpc trust).
        """CREATE TABLE fed_pins (
            node_id BLOB PRIMARY KEY,
            public_key BLOB,
            state TEXT NOT NULL CHECK (state IN ('trusted', 'refused')),
            address TEXT NOT NULL,
            first_seen_ms INTEGER NOT NULL,
            last_seen_ms INTEGER NOT NULL
        ) WITHOUT ROWID""",
        # Which node answered at an address: a different key there is a changed key.
        """CREATE TABLE fed_addresses (
            address TEXT PRIMARY KEY,
            node_id BLOB NOT NULL,
            bound_ms INTEGER NOT NULL
        ) WITHOUT ROWID""",
        # Hop-by-hop custody: what this node acknowledged and still owes its next hop.
        # A row leaves only when the next hop acknowledged storing it (or it expired).
        # origin: the sending user's fingerprint as declared with the envelope (proven
        # to this node if it entered here), forwarded unchanged so the recipient's home
        # node can apply mailbox fairness to it; NULL when the previous hop declared none.
        """CREATE TABLE relay_queue (
            id INTEGER PRIMARY KEY,
            next_hop BLOB NOT NULL,
            from_node BLOB NOT NULL,
            origin BLOB CHECK (origin IS NULL OR length(origin) = 32),
            msg_id BLOB NOT NULL,
            recipient BLOB NOT NULL,
            expiry_ms INTEGER NOT NULL,
            hop_limit INTEGER NOT NULL,
            ciphertext BLOB NOT NULL,
            enqueued_ms INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_ms INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE UNIQUE INDEX relay_queue_by_msg_id ON relay_queue(msg_id)",
        "CREATE INDEX relay_queue_by_hop ON relay_queue(next_hop, next_attempt_ms, id)",
        "CREATE INDEX relay_queue_by_source ON relay_queue(from_node)",
        "CREATE INDEX relay_queue_by_expiry ON relay_queue(expiry_ms)",
        # msg_ids this node relayed, kept until their expiry: a second copy (another
        # path, a retry after a lost ack) is a duplicate, not a second relay.
        """CREATE TABLE relay_seen (
            msg_id BLOB PRIMARY KEY,
            expiry_ms INTEGER NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX relay_seen_by_expiry ON relay_seen(expiry_ms)",
    ),
    # 6: home bindings (store/homes.py), so a restarted node still knows where users
    # are homed (and that its own users are homed here) before anyone re-announces.
    (
        # binding: the signed HomeBinding as encoded on the wire (verified again on
        # load); node and expiry_ms copied out of it for the queries.
        """CREATE TABLE home_bindings (
            user BLOB PRIMARY KEY,
            node BLOB NOT NULL,
            expiry_ms INTEGER NOT NULL,
            stored_ms INTEGER NOT NULL,
            binding BLOB NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX home_bindings_by_expiry ON home_bindings(expiry_ms)",
        "CREATE INDEX home_bindings_by_age ON home_bindings(stored_ms)",
    ),
    # 7: hand-over custody (store/federation.py relay_handover): mail a re-homed user
    # left in this node's mailbox, owed to its new home. Such rows are retried, never
    # dropped, when the new home's fairness refuses them for now.
    ("ALTER TABLE relay_queue ADD COLUMN handover INTEGER NOT NULL DEFAULT 0",),
    # 8: the custody share of one sending user (RelayQueueLimits.max_per_origin) is
    # counted per (from_node, origin); that index also serves the per-source count.
    (
        "DROP INDEX relay_queue_by_source",
        "CREATE INDEX relay_queue_by_origin ON relay_queue(from_node, origin)",
    ),
    # 9: broadcast channel messages (store/channels.py). seq is the node-wide number
    # clients page with (AUTOINCREMENT: never reused after a delete). data NULL: a
    # tombstone (evicted or past retention) kept until expiry_ms so a late copy is a
    # duplicate; keep_until_ms = min(expiry_ms, received + retention).
    (
        """CREATE TABLE channel_messages (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            msg_id BLOB NOT NULL UNIQUE,
            channel_id BLOB NOT NULL,
            expiry_ms INTEGER NOT NULL,
            keep_until_ms INTEGER NOT NULL,
            received_ms INTEGER NOT NULL,
            size INTEGER NOT NULL,
            data BLOB
        )""",
        "CREATE INDEX channel_messages_by_channel ON channel_messages(channel_id, seq)",
        "CREATE INDEX channel_messages_by_keep ON channel_messages(keep_until_ms)",
        "CREATE INDEX channel_messages_by_expiry ON channel_messages(expiry_ms)",
        # Live messages and their bytes, so the caps are checked in O(1).
        """CREATE TABLE channel_totals (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            messages INTEGER NOT NULL,
            bytes INTEGER NOT NULL
        )""",
    ),
    # 10: store-and-forward (store/held.py): envelopes held while no route to the
    # recipient's home exists, the origin node carried hop by hop, receipt
    # tombstones, and the trail receipts travel back along.
    (
        # id: arrival order (release keeps it). hop_limit as it arrived: holding costs
        # no hop, the decrement happens when it is released toward a next hop.
        # origin_node: where it entered the federation (quota key). tokens: spray
        # tokens left (qpc_node/storefwd/held.py). No index on msg_id (a page
        # written per hold and per release): the seen row every held envelope has
        # points at its row (relay_seen.held), checked against msg_id.
        """CREATE TABLE held (
            id INTEGER PRIMARY KEY,
            msg_id BLOB NOT NULL,
            recipient BLOB NOT NULL,
            expiry_ms INTEGER NOT NULL,
            hop_limit INTEGER NOT NULL,
            ciphertext BLOB NOT NULL,
            origin BLOB CHECK (origin IS NULL OR length(origin) = 32),
            origin_node BLOB NOT NULL,
            from_node BLOB NOT NULL,
            tokens INTEGER NOT NULL,
            held_ms INTEGER NOT NULL
        )""",
        "CREATE INDEX held_by_recipient ON held(recipient, id)",
        # Quota per origin node, eviction within it, and the expiry sweep (a seek per
        # origin node): one index, not two, since each is a page written per envelope.
        "CREATE INDEX held_by_origin_node ON held(origin_node, expiry_ms)",
        "ALTER TABLE relay_queue ADD COLUMN origin_node BLOB",
        # delivered: a valid receipt came (tombstone until expiry_ms). peer: where
        # its receipt goes back to, the node it came from (NULL: it entered here) --
        # in the seen row every relayed envelope writes anyway, not a row of its own.
        "ALTER TABLE relay_seen ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE relay_seen ADD COLUMN peer BLOB",
        # held: the id of its held row while held (stale after it left: readers
        # match held.msg_id too, so a reused id is never taken for it).
        "ALTER TABLE relay_seen ADD COLUMN held INTEGER",
        # Further receipt targets for msg_id: carriers a spray copy went to.
        """CREATE TABLE relay_trail (
            msg_id BLOB NOT NULL,
            peer BLOB NOT NULL,
            expiry_ms INTEGER NOT NULL,
            PRIMARY KEY (msg_id, peer)
        ) WITHOUT ROWID""",
        "CREATE INDEX relay_trail_by_expiry ON relay_trail(expiry_ms)",
    ),
    # 11: inventory sync of receipts (storefwd/sources.py): the signed receipt a
    # tombstone stands for (an encoded DeliveryReceipt), so a node can hand it to a
    # neighbour that still holds a copy (and after a restart: the in-memory receipt
    # queues are gone, the tombstone is not).
    ("ALTER TABLE relay_seen ADD COLUMN receipt BLOB",),
    # 12: an acked message leaves ``messages`` (store/mailbox.py): its row is deleted and
    # a small tombstone here keeps (recipient, msg_id) -> seq until expiry, so a late
    # retry is still a duplicate. Why: the tombstone used to be the message row itself
    # with the ciphertext set to NULL, so every ack rewrote the payload's pages and the
    # table's pages never emptied for reuse (bench/node_bench.py: 10.1 KB written per
    # delivered 1 KiB message; the deleted payload's pages are now freed and the next
    # enqueue reuses them). Existing tombstones move over.
    (
        """CREATE TABLE delivered (
            recipient BLOB NOT NULL,
            msg_id BLOB NOT NULL,
            seq INTEGER NOT NULL,
            expiry_ms INTEGER NOT NULL,
            PRIMARY KEY (recipient, msg_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX delivered_by_expiry ON delivered(expiry_ms)",
        "INSERT INTO delivered (recipient, msg_id, seq, expiry_ms)"
        " SELECT recipient, msg_id, seq, expiry_ms FROM messages WHERE ciphertext IS NULL",
        "DELETE FROM messages WHERE ciphertext IS NULL",
    ),
    # 13: a hand-over of msg_id (a re-homed user's old home moved it toward the new
    # home) was relayed here (store/held.py handover_passes): a relay reopens its
    # delivered tombstone for one hand-over only, so a replayed one is a duplicate.
    ("ALTER TABLE relay_seen ADD COLUMN handover INTEGER NOT NULL DEFAULT 0",),
    # 14: flash writes per delivered message (store/mailbox.py, docs/performance.md). An
    # ack moves the mailbox's ``acked_seq`` watermark (one small row, durable in the
    # ack's commit); the acked rows are deleted in the next write transaction, where the
    # enqueue it carries reuses their pages. Their tombstones are appended to
    # ``delivered_log`` (rowid order: only its tail page changes) and moved into
    # ``delivered`` in bulk, sorted, every few thousand: a random-keyed insert per ack
    # into ``delivered`` wrote a page per tombstone (~4 KB of 7.7 KB per message).
    (
        "ALTER TABLE mailboxes ADD COLUMN acked_seq INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE delivered_log (
            id INTEGER PRIMARY KEY,
            recipient BLOB NOT NULL,
            msg_id BLOB NOT NULL,
            seq INTEGER NOT NULL,
            expiry_ms INTEGER NOT NULL
        )""",
    ),
    # 15: a mailbox message's ciphertext goes to the append-only payload log
    # (store/payload_log.py): the row keeps (seg, off) and ``size``, ``ciphertext`` is
    # NULL. Why: in SQLite the 1,280 B payload of a 1 KiB message was written to the
    # WAL with its leaf cell and again by the checkpoint (bench/node_bench.py: 2.7 x the
    # payload per delivered message). Rows stored before keep their ciphertext inline
    # and are read as before. Two of the three indexes every enqueue and reclaim wrote
    # go (docs/performance.md): the (recipient, msg_id) index of random ids had most of
    # its pages written by every commit; the duplicate check takes the candidate row
    # from an in-memory map rebuilt at open (store/mailbox.py Tombstones) and confirms
    # it by (recipient, seq), and (recipient, msg_id) stays unique through that check
    # in enqueue, the only writer, inside its transaction. The expiry index goes too:
    # the minute's sweep scans the rows, ~100 B each now that the payloads are
    # elsewhere.
    (
        "ALTER TABLE messages ADD COLUMN seg INTEGER",
        "ALTER TABLE messages ADD COLUMN off INTEGER",
        "DROP INDEX messages_by_expiry",
        "DROP INDEX messages_by_msg_id",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(conn: sqlite3.Connection, *, target: int = SCHEMA_VERSION) -> int:
    """Bring the file up to ``target``; return how many migrations ran.

    ``target`` below the latest exists for tests that need an old-version file.
    """
    current = schema_version(conn)
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(current, SCHEMA_VERSION)
    ran = 0
    for version in range(current + 1, target + 1):
        with transaction(conn):
            # Re-read inside the write lock: another process may have migrated meanwhile.
            if schema_version(conn) >= version:
                continue
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version:d}")
        ran += 1
    return ran

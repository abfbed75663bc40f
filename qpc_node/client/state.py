"""A user agent's local state: conversations, contacts, received texts, outbox.

Lives in the user's data dir (``client.db``) beside the MLS state. Message text
is sealed with AES-256-GCM under a key derived from the at-rest secret, so the
file alone reveals neither texts nor who said them beyond counts; the outbox
holds envelopes that are already MLS ciphertext.

Synchronous and single-connection; the async client runs every call through one
thread (see ``AsyncClientState``) so the Trio loop never blocks on SQLite.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import ParamSpec, TypeVar

import msgspec
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qpc_node.errors import QpcError, StatusCode
from qpc_node.store.sql import transaction

P = ParamSpec("P")
T = TypeVar("T")

DB_FILE = "client.db"
_SCHEMA = 6
SEEN_KEEP_MS = 15 * 24 * 3600 * 1000
"""How long a received message id is remembered: longer than any envelope lives
(the outbox's retention), so a copy delivered late by another node is still known."""
TEXT_SEEN_KEEP_MS = 14 * 24 * 3600 * 1000
"""How long a shown text's (sender, app id) is remembered: a resend after a branch
switch is made at most one envelope lifetime (7 d) after the original and is in
flight at most one more, so twice the largest expiry covers every copy."""
MAX_BRANCH_TEXTS = 1024
"""Own texts kept per group for a resend on a winning branch (the oldest go first)."""
MAX_CONTACT_NAME = 32
MAX_CHANNELS = 64
"""Channels one client joins at most: what one Channel/Fetch may name."""
_DDL = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    name TEXT PRIMARY KEY,
    group_id BLOB NOT NULL UNIQUE,
    direct INTEGER NOT NULL,
    peer BLOB,
    committer BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS contacts (
    fingerprint BLOB PRIMARY KEY,
    verified INTEGER NOT NULL DEFAULT 0,
    first_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL,
    conv TEXT NOT NULL,
    sealed BLOB NOT NULL,
    ts_ms INTEGER NOT NULL,
    shown INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox (
    msg_id BLOB PRIMARY KEY,
    envelope BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_commits (
    commit_id BLOB PRIMARY KEY,
    group_id BLOB NOT NULL,
    followup BLOB,
    cancelled INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS commit_msgs (
    msg_id BLOB PRIMARY KEY,
    commit_id BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS held (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    expiry_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
"""

# Migrations by position: _MIGRATIONS[i] takes a v(i+1) database to v(i+2).
_MIGRATIONS: tuple[str, ...] = (
    # v2 (the mesh): contact names (sealed), a mailbox cursor per node (a node's
    # sequence numbers mean nothing on another), held messages keyed by node and
    # seq, message ids already received (a copy from another node is not shown
    # twice), and the nodes this client knows (failover when its node is dead).
    """
    ALTER TABLE contacts ADD COLUMN name_sealed BLOB;
    CREATE TABLE cursors (node BLOB PRIMARY KEY, seq INTEGER NOT NULL);
    CREATE TABLE held2 (
        node BLOB NOT NULL,
        seq INTEGER NOT NULL,
        payload BLOB NOT NULL,
        expiry_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (node, seq)
    );
    INSERT INTO held2 (node, seq, payload, expiry_ms, attempts)
        SELECT x'', seq, payload, expiry_ms, attempts FROM held;
    DROP TABLE held;
    ALTER TABLE held2 RENAME TO held;
    CREATE TABLE seen (msg_id BLOB PRIMARY KEY, ts_ms INTEGER NOT NULL);
    CREATE INDEX seen_ts ON seen (ts_ms);
    CREATE TABLE nodes (
        node_id BLOB PRIMARY KEY,
        addresses TEXT NOT NULL,
        rtt_ms REAL,
        last_seen_ms INTEGER NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0
    );
    """,
    # v3 (broadcast channels): joined channels, name -> secret (sealed like contact
    # names), and a cursor per node and channel (a node numbers channel messages with
    # its own sequence, shared by all channels).
    """
    CREATE TABLE channels (
        name TEXT PRIMARY KEY,
        channel_id BLOB NOT NULL UNIQUE,
        secret_sealed BLOB NOT NULL,
        joined_ms INTEGER NOT NULL
    );
    CREATE TABLE channel_cursors (
        node BLOB NOT NULL,
        channel_id BLOB NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (node, channel_id)
    );
    """,
    # v4 (groups on a mesh, docs/groups.md): a commit's Welcome is sent only after
    # the commit merged, to the members it added (known then); the roster before
    # the commit (32-byte fingerprints) names them if the merge happened before a
    # crash. Our own membership requests (intents), re-proposed until applied.
    """
    ALTER TABLE pending_commits ADD COLUMN welcome BLOB;
    ALTER TABLE pending_commits ADD COLUMN roster BLOB;
    CREATE TABLE group_intents (
        intent_id BLOB PRIMARY KEY,
        group_id BLOB NOT NULL,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    """,
    # v5 (a crash in the middle of a branch switch, docs/groups.md): per group the
    # fork resolver's state and the snapshot to return to if a merge or a staged
    # sibling commit was interrupted (``trial``); our texts of the retained epochs
    # (resent if their branch loses); the resends a switch decided and that are not
    # queued yet; the (sender, app id) of texts shown, keyed (HMAC), until expiry.
    """
    CREATE TABLE group_branches (
        group_id BLOB PRIMARY KEY,
        state BLOB NOT NULL,
        trial INTEGER,
        texts_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE branch_texts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        group_id BLOB NOT NULL,
        app_id BLOB NOT NULL,
        tag BLOB NOT NULL,
        body BLOB NOT NULL,
        sent_ms INTEGER NOT NULL,
        UNIQUE (group_id, app_id)
    );
    CREATE TABLE branch_resends (
        group_id BLOB NOT NULL,
        app_id BLOB NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (group_id, app_id)
    );
    CREATE TABLE seen_texts (key BLOB PRIMARY KEY, expiry_ms INTEGER NOT NULL);
    CREATE INDEX seen_texts_expiry ON seen_texts (expiry_ms);
    """,
    # v6 (what a restart forgot after a switch or rejoin, docs/groups.md): who got each
    # pending resend on the losing branch (sealed: a member of it not on the winner is
    # owed the text), and the texts owed to such members until a commit adds them back.
    # The rejoin history, the members our commits added and the re-adds a switch decided
    # are in ``group_branches.state`` (branch_store.py record version 2).
    """
    ALTER TABLE branch_resends ADD COLUMN recipients BLOB;
    CREATE TABLE branch_owed (
        group_id BLOB NOT NULL,
        member BLOB NOT NULL,
        app_id BLOB NOT NULL,
        body BLOB NOT NULL,
        owed_ms INTEGER NOT NULL,
        PRIMARY KEY (group_id, member, app_id)
    );
    """,
)


class ClientStateError(QpcError):
    code = StatusCode.FAILED_PRECONDITION


class Conversation(msgspec.Struct, frozen=True):
    name: str
    group_id: bytes
    direct: bool
    peer: bytes | None
    committer: bytes


class Received(msgspec.Struct, frozen=True):
    id: int
    seq: int
    conv: str
    sender: bytes
    text: str
    ts_ms: int


class Contact(msgspec.Struct, frozen=True):
    fingerprint: bytes
    name: str | None
    verified: bool
    first_seen_ms: int


class JoinedChannel(msgspec.Struct, frozen=True):
    name: str
    channel_id: bytes
    secret: bytes


class KnownNode(msgspec.Struct, frozen=True):
    """A mesh node this client has heard of (from its node's peer list, or used)."""

    node_id: bytes
    addresses: tuple[str, ...]
    """``host:port`` / ``[v6%scope]:port`` where it answered, best first."""
    rtt_ms: float | None
    last_seen_ms: int
    failures: int


class Held(msgspec.Struct, frozen=True):
    """A delivered message we could not process yet (future epoch, group not joined)."""

    seq: int
    payload: bytes
    expiry_ms: int
    attempts: int
    node: bytes = b""
    """The node whose mailbox numbered it ``seq``."""


class Outgoing(msgspec.Struct, frozen=True):
    msg_id: bytes
    envelope: bytes
    attempts: int
    next_ms: int
    commit: bytes | None = None
    """The pending commit this message is part of (sent all-or-nothing with it)."""


class CommitRecord(msgspec.Struct, frozen=True):
    """Our commit to a group, made but not applied: it waits for the node to store
    its whole fan-out (then merge) or to refuse it (then clear)."""

    commit_id: bytes
    group_id: bytes
    followup: bytes | None
    """An AppMessage to send in the new epoch once merged (the GroupInfo after a Welcome)."""
    cancelled: bool
    remaining: int
    """Messages of its fan-out still in the outbox."""
    welcome: bytes | None = None
    """The Welcome to send, after the merge, to the members the commit added."""
    roster: tuple[bytes, ...] = ()
    """The members before the commit (who the added ones are if it merged before a crash)."""


class BranchRecord(msgspec.Struct, frozen=True):
    """A group's persisted branch state (qpc_node/client/branch_store.py decodes ``state``)."""

    group_id: bytes
    state: bytes
    trial: int | None
    """Snapshot to roll back to when the group is not at the recorded tip: a merge or a
    staged sibling commit was interrupted before its result was recorded."""
    texts_seq: int
    """Our texts up to this ``branch_texts.seq`` are noted in ``state``; later ones not."""


class BranchText(msgspec.Struct, frozen=True):
    seq: int
    app_id: bytes
    tag: bytes
    """Branch tag of the epoch it was sent in."""


class PendingResend(msgspec.Struct, frozen=True):
    group_id: bytes
    app_id: bytes
    body: bytes
    """The AppMessage to encrypt again on the winning branch (same app id)."""
    recipients: tuple[bytes, ...] = ()
    """Who it went to on the losing branch (a member not on the winner is owed it)."""


class OwedText(msgspec.Struct, frozen=True):
    """Our text re-sent on the winner that ``member`` (added only on the losing branch,
    not back yet) did not get: sent to it alone once a commit adds it again."""

    member: bytes
    app_id: bytes
    body: bytes


class ClientState:
    def __init__(self, data_dir: Path, secret: bytes) -> None:
        self._conn = sqlite3.connect(
            data_dir / DB_FILE, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        # Deleted rows (spent keys, old group states) are zeroed on disk, not left in free
        # pages. Debian's SQLite has this on by default; others (and an upgrade) need not.
        self._conn.execute("PRAGMA secure_delete = ON")
        self._conn.executescript(_DDL)
        self._aead = AESGCM(
            HKDF(hashes.SHA256(), 32, salt=None, info=b"qpc-client-db-v1").derive(secret)
        )
        self._seen_key = HKDF(hashes.SHA256(), 32, salt=None, info=b"qpc-seen-texts-v1").derive(
            secret
        )
        if self.get_meta("schema") is None:
            self.set_meta("schema", (1).to_bytes(4, "big"))
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self) -> None:
        """Bring a database of an older schema up to ``_SCHEMA``, one step per transaction."""
        version = int.from_bytes(self.get_meta("schema") or b"", "big")
        if version > _SCHEMA:
            raise ClientStateError(
                f"client.db has schema {version}, newer than this qpc ({_SCHEMA}): upgrade qpc"
            )
        for v in range(version, _SCHEMA):
            with transaction(self._conn):
                for stmt in _MIGRATIONS[v - 1].split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                if v == 1:
                    # The one cursor so far belongs to the node this client used: it is
                    # claimed by the first node it connects to (see claim_cursor).
                    old = self.get_meta("cursor")
                    if old is not None:
                        self._conn.execute(
                            "INSERT INTO cursors (node, seq) VALUES (x'', ?)",
                            (int.from_bytes(old, "big"),),
                        )
                        self._conn.execute("DELETE FROM meta WHERE k = 'cursor'")
                self.set_meta("schema", (v + 1).to_bytes(4, "big"))

    def close(self) -> None:
        self._conn.close()

    # -- sealing -------------------------------------------------------------
    def _seal(self, plain: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plain, aad)

    def _open(self, sealed: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], aad)
        except InvalidTag:
            raise ClientStateError("local state was tampered with or the key is wrong") from None

    # -- meta ----------------------------------------------------------------
    def get_meta(self, k: str) -> bytes | None:
        row = self._conn.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, k: str, v: bytes) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (k, v))

    def cursor(self, node: bytes = b"") -> int:
        """The last mailbox seq processed on ``node`` (each node numbers its own mailbox;
        ``b""``: the node of a client from before the mesh, until one claims it)."""
        row = self._conn.execute("SELECT seq FROM cursors WHERE node = ?", (node,)).fetchone()
        return 0 if row is None else int(row[0])

    def claim_cursor(self, node: bytes) -> bool:
        """The first node we connect to after the upgrade takes the cursor kept for the
        node we used before (the only one a pre-mesh client knew); True when it did."""
        with transaction(self._conn):
            if self._conn.execute("SELECT 1 FROM cursors WHERE node = ?", (node,)).fetchone():
                return False
            cur = self._conn.execute("UPDATE cursors SET node = ? WHERE node = x''", (node,))
            if cur.rowcount:
                self._conn.execute("UPDATE held SET node = ? WHERE node = x''", (node,))
            return cur.rowcount == 1

    # -- conversations -------------------------------------------------------
    def add_conversation(self, conv: Conversation, now_ms: int) -> None:
        try:
            self._conn.execute(
                "INSERT INTO conversations (name, group_id, direct, peer, committer, created_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (conv.name, conv.group_id, int(conv.direct), conv.peer, conv.committer, now_ms),
            )
        except sqlite3.IntegrityError:
            raise ClientStateError(f"conversation {conv.name!r} already exists") from None

    def describe_conversation(
        self, group_id: bytes, *, name: str, direct: bool, peer: bytes | None, committer: bytes
    ) -> None:
        """Fill in what a joiner learns after the Welcome (name, kind, committer)."""
        try:
            self._conn.execute(
                "UPDATE conversations SET name = ?, direct = ?, peer = ?, committer = ?"
                " WHERE group_id = ?",
                (name, int(direct), peer, committer, group_id),
            )
        except sqlite3.IntegrityError:
            raise ClientStateError(f"conversation {name!r} already exists") from None

    def drop_conversation(self, name: str) -> None:
        self._conn.execute("DELETE FROM conversations WHERE name = ?", (name,))

    # -- our membership requests (docs/groups.md) ---------------------------------
    def intent_add(
        self, intent_id: bytes, group_id: bytes, kind: str, target: str, now_ms: int
    ) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO group_intents (intent_id, group_id, kind, target, created_ms)"
            " VALUES (?, ?, ?, ?, ?)",
            (intent_id, group_id, kind, target, now_ms),
        )

    def intent_done(self, intent_id: bytes) -> None:
        self._conn.execute("DELETE FROM group_intents WHERE intent_id = ?", (intent_id,))

    def intents_of(self, group_id: bytes) -> list[tuple[bytes, str, str, int]]:
        """(intent id, kind, target, created) of our open requests in a group, oldest first."""
        rows = self._conn.execute(
            "SELECT intent_id, kind, target, created_ms FROM group_intents WHERE group_id = ?"
            " ORDER BY created_ms, rowid",
            (group_id,),
        ).fetchall()
        return [(bytes(i), str(k), str(t), int(c)) for i, k, t, c in rows]

    def _conv(self, where: str, arg: object) -> Conversation | None:
        row = self._conn.execute(
            "SELECT name, group_id, direct, peer, committer FROM conversations WHERE " + where,
            (arg,),
        ).fetchone()
        if row is None:
            return None
        return Conversation(
            row[0], bytes(row[1]), bool(row[2]), row[3] and bytes(row[3]), bytes(row[4])
        )

    def undescribed_since(self, group_id: bytes) -> int | None:
        """When we joined ``group_id`` by a Welcome whose GroupInfo follow-up has not
        been read yet (the conversation is still a placeholder); None otherwise."""
        row = self._conn.execute(
            "SELECT created_ms FROM conversations WHERE group_id = ? AND committer = x''",
            (group_id,),
        ).fetchone()
        return None if row is None else int(row[0])

    def conversation(self, name: str) -> Conversation | None:
        return self._conv("name = ?", name)

    def conversation_by_group(self, group_id: bytes) -> Conversation | None:
        return self._conv("group_id = ?", group_id)

    def direct_with(self, peer: bytes) -> Conversation | None:
        return self._conv("direct = 1 AND peer = ?", peer)

    def conversations(self) -> list[Conversation]:
        rows = self._conn.execute("SELECT name FROM conversations ORDER BY name").fetchall()
        return [c for (n,) in rows if (c := self.conversation(n)) is not None]

    # -- contacts ------------------------------------------------------------
    def see_contact(self, fpr: bytes, now_ms: int) -> bool:
        """Record a contact; True when it is new."""
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO contacts (fingerprint, first_seen_ms) VALUES (?, ?)",
            (fpr, now_ms),
        )
        return cur.rowcount == 1

    def short_code_clash(self, fpr: bytes) -> bytes | None:
        """A known contact whose short code equals ``fpr``'s but whose key differs.

        People recognise contacts by short code; a different key behind the same
        short code is an impersonation attempt or a changed key, never silently ok.
        """
        for (other,) in self._conn.execute("SELECT fingerprint FROM contacts"):
            o = bytes(other)
            if o != fpr and o[:4] == fpr[:4]:
                return o
        return None

    def set_verified(self, fpr: bytes, now_ms: int) -> None:
        self.see_contact(fpr, now_ms)
        self._conn.execute("UPDATE contacts SET verified = 1 WHERE fingerprint = ?", (fpr,))

    def is_verified(self, fpr: bytes) -> bool:
        row = self._conn.execute(
            "SELECT verified FROM contacts WHERE fingerprint = ?", (fpr,)
        ).fetchone()
        return bool(row and row[0])

    def contacts(self) -> list[Contact]:
        """Every known contact (named or only seen), named ones first, by name."""
        out = []
        for fpr, verified, first, sealed in self._conn.execute(
            "SELECT fingerprint, verified, first_seen_ms, name_sealed FROM contacts"
        ).fetchall():
            f = bytes(fpr)
            name = None if sealed is None else self._open(bytes(sealed), b"name" + f).decode()
            out.append(Contact(f, name, bool(verified), int(first)))
        return sorted(out, key=lambda c: (c.name is None, c.name or "", c.fingerprint))

    def name_contact(self, name: str, fpr: bytes, now_ms: int) -> None:
        """Give ``fpr`` the name ``name`` (replacing its old name); a name is unique."""
        for other in self.contacts():
            if other.name == name and other.fingerprint != fpr:
                raise ClientStateError(
                    f"the name {name!r} is taken by {other.fingerprint.hex()[:8]}: "
                    "remove it first (/contact remove)"
                )
        sealed = self._seal(name.encode(), b"name" + fpr)
        with transaction(self._conn):
            self.see_contact(fpr, now_ms)
            self._conn.execute(
                "UPDATE contacts SET name_sealed = ? WHERE fingerprint = ?", (sealed, fpr)
            )

    def unname_contact(self, name: str) -> bytes | None:
        """Forget the name ``name`` (the contact itself stays known); its fingerprint."""
        for c in self.contacts():
            if c.name == name:
                self._conn.execute(
                    "UPDATE contacts SET name_sealed = NULL WHERE fingerprint = ?",
                    (c.fingerprint,),
                )
                return c.fingerprint
        return None

    # -- broadcast channels ------------------------------------------------------
    def join_channel(self, name: str, channel_id: bytes, secret: bytes, now_ms: int) -> None:
        """Remember a channel under ``name``; a name or a channel is joined once."""
        sealed = self._seal(secret, b"channel" + channel_id)
        count = self._conn.execute("SELECT count(*) FROM channels").fetchone()[0]
        if count >= MAX_CHANNELS:
            raise ClientStateError(f"already in {MAX_CHANNELS} channels: leave one first")
        try:
            self._conn.execute(
                "INSERT INTO channels (name, channel_id, secret_sealed, joined_ms)"
                " VALUES (?, ?, ?, ?)",
                (name, channel_id, sealed, now_ms),
            )
        except sqlite3.IntegrityError:
            other = self._conn.execute(
                "SELECT name FROM channels WHERE channel_id = ?", (channel_id,)
            ).fetchone()
            if other is not None:
                raise ClientStateError(f"already joined as {other[0]!r}") from None
            raise ClientStateError(f"a channel named {name!r} exists") from None

    def leave_channel(self, name: str) -> bool:
        """Forget the channel's secret and cursors; False when no such channel."""
        with transaction(self._conn):
            row = self._conn.execute(
                "SELECT channel_id FROM channels WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                return False
            self._conn.execute("DELETE FROM channels WHERE name = ?", (name,))
            self._conn.execute("DELETE FROM channel_cursors WHERE channel_id = ?", (row[0],))
        return True

    def channels(self) -> list[JoinedChannel]:
        rows = self._conn.execute(
            "SELECT name, channel_id, secret_sealed FROM channels ORDER BY name"
        ).fetchall()
        return [
            JoinedChannel(n, bytes(c), self._open(bytes(s), b"channel" + bytes(c)))
            for n, c, s in rows
        ]

    def channel(self, name: str) -> JoinedChannel | None:
        return next((c for c in self.channels() if c.name == name), None)

    def channel_cursors(self, node: bytes) -> dict[bytes, int]:
        rows = self._conn.execute(
            "SELECT channel_id, seq FROM channel_cursors WHERE node = ?", (node,)
        ).fetchall()
        return {bytes(c): int(q) for c, q in rows}

    def _advance_channel(self, node: bytes, channel_id: bytes, seq: int) -> None:
        self._conn.execute(
            "INSERT INTO channel_cursors (node, channel_id, seq) VALUES (?, ?, ?)"
            " ON CONFLICT (node, channel_id) DO UPDATE SET seq = max(seq, excluded.seq)",
            (node, channel_id, seq),
        )

    def advance_channel_cursor(
        self, node: bytes, channel_id: bytes, seq: int, msg_id: bytes = b"", now_ms: int = 0
    ) -> None:
        with transaction(self._conn):
            self._advance_channel(node, channel_id, seq)
            self._saw(msg_id, now_ms)

    def store_channel_received(
        self,
        seq: int,
        conv: str,
        sender: bytes,
        text: str,
        ts_ms: int,
        *,
        node: bytes,
        channel_id: bytes,
        msg_id: bytes,
    ) -> None:
        """Keep a channel message's text, move its channel's cursor and remember its id,
        in one transaction (shown once, even when another node delivers it again)."""
        sealed = self._seal(sender + text.encode("utf-8"), conv.encode("utf-8"))
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO inbox (seq, conv, sealed, ts_ms) VALUES (?, ?, ?, ?)",
                (seq, conv, sealed, ts_ms),
            )
            self._advance_channel(node, channel_id, seq)
            self._saw(msg_id, ts_ms)

    # -- nodes this client knows (for /mesh auto and failover) ----------------
    def remember_node(
        self, node_id: bytes, addresses: list[str], rtt_ms: float | None, now_ms: int
    ) -> None:
        """Note a node and where it answers; an unknown RTT keeps the last one measured."""
        self._conn.execute(
            "INSERT INTO nodes (node_id, addresses, rtt_ms, last_seen_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (node_id) DO UPDATE SET addresses = excluded.addresses,"
            " rtt_ms = coalesce(excluded.rtt_ms, rtt_ms), last_seen_ms = excluded.last_seen_ms",
            (node_id, "\n".join(addresses), rtt_ms, now_ms),
        )

    def node_result(self, node_id: bytes, *, ok: bool) -> None:
        """Count a failed dial (reset on success): the order of failover candidates."""
        self._conn.execute(
            "UPDATE nodes SET failures = CASE WHEN ? THEN 0 ELSE failures + 1 END"
            " WHERE node_id = ?",
            (ok, node_id),
        )

    def nodes(self) -> list[KnownNode]:
        rows = self._conn.execute(
            "SELECT node_id, addresses, rtt_ms, last_seen_ms, failures FROM nodes"
        ).fetchall()
        return [
            KnownNode(bytes(n), tuple(a for a in str(addrs).split("\n") if a), r, t, f)
            for n, addrs, r, t, f in rows
        ]

    # -- inbox ---------------------------------------------------------------
    # Mailbox sequence numbers are per node: every cursor and held message names
    # the node (``node``, b"" for a pre-mesh client's one node). ``msg_id``, when
    # given, is remembered as received in the same transaction (see ``seen``).
    def store_received(
        self,
        seq: int,
        conv: str,
        sender: bytes,
        text: str,
        ts_ms: int,
        *,
        cursor: int,
        node: bytes = b"",
        msg_id: bytes = b"",
        app_id: bytes = b"",
    ) -> None:
        """Keep a received text and advance the fetch cursor in one transaction
        (``app_id``: remembered with it, see ``text_seen``)."""
        sealed = self._seal(sender + text.encode("utf-8"), conv.encode("utf-8"))
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO inbox (seq, conv, sealed, ts_ms) VALUES (?, ?, ?, ?)",
                (seq, conv, sealed, ts_ms),
            )
            self._advance(node, cursor)
            self._saw(msg_id, ts_ms)
            self._saw_text(sender, app_id, ts_ms)

    def advance_cursor(
        self, cursor: int, *, node: bytes = b"", msg_id: bytes = b"", now_ms: int = 0
    ) -> None:
        with transaction(self._conn):
            self._advance(node, cursor)
            self._saw(msg_id, now_ms)

    def hold(
        self,
        seq: int,
        payload: bytes,
        expiry_ms: int,
        *,
        cursor: int,
        node: bytes = b"",
        msg_id: bytes = b"",
        now_ms: int = 0,
    ) -> None:
        """Keep a message to retry later and advance the cursor past it, atomically.

        The node may then delete it (we ack past it): from here on client.db owns it.
        """
        with transaction(self._conn):
            self._conn.execute(
                "INSERT OR IGNORE INTO held (node, seq, payload, expiry_ms) VALUES (?, ?, ?, ?)",
                (node, seq, payload, expiry_ms),
            )
            self._advance(node, cursor)
            self._saw(msg_id, now_ms)

    def held(self) -> list[Held]:
        rows = self._conn.execute(
            "SELECT seq, payload, expiry_ms, attempts, node FROM held ORDER BY rowid"
        ).fetchall()
        return [Held(q, bytes(p), e, a, bytes(n)) for q, p, e, a, n in rows]

    def held_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM held").fetchone()[0])

    def held_tried(self, seq: int, node: bytes = b"") -> None:
        self._conn.execute(
            "UPDATE held SET attempts = attempts + 1 WHERE node = ? AND seq = ?", (node, seq)
        )

    def held_done(self, seq: int, node: bytes = b"") -> None:
        self._conn.execute("DELETE FROM held WHERE node = ? AND seq = ?", (node, seq))

    def store_held_received(
        self,
        seq: int,
        conv: str,
        sender: bytes,
        text: str,
        ts_ms: int,
        node: bytes = b"",
        *,
        app_id: bytes = b"",
    ) -> None:
        """A held message finally decrypted: keep its text and forget it, atomically
        (so it is shown once, never twice)."""
        sealed = self._seal(sender + text.encode("utf-8"), conv.encode("utf-8"))
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO inbox (seq, conv, sealed, ts_ms) VALUES (?, ?, ?, ?)",
                (seq, conv, sealed, ts_ms),
            )
            self._conn.execute("DELETE FROM held WHERE node = ? AND seq = ?", (node, seq))
            self._saw_text(sender, app_id, ts_ms)

    def _advance(self, node: bytes, cursor: int) -> None:
        self._conn.execute(
            "INSERT INTO cursors (node, seq) VALUES (?, ?)"
            " ON CONFLICT (node) DO UPDATE SET seq = max(seq, excluded.seq)",
            (node, cursor),
        )

    # -- messages already received (from any node) ----------------------------
    def _saw(self, msg_id: bytes, now_ms: int) -> None:
        if msg_id:
            self._conn.execute(
                "INSERT OR IGNORE INTO seen (msg_id, ts_ms) VALUES (?, ?)", (msg_id, now_ms)
            )

    def seen(self, msg_id: bytes) -> bool:
        """Was a message with this id received before (from this node or another)?

        A message reaches us twice when its sender's outbox retried it after an
        answer was lost, or when our old home forwards what it held after we moved.
        """
        return (
            self._conn.execute("SELECT 1 FROM seen WHERE msg_id = ?", (msg_id,)).fetchone()
            is not None
        )

    def forget_seen_before(self, before_ms: int) -> int:
        """Drop ids older than any copy could still arrive (bounded table)."""
        cur = self._conn.execute("DELETE FROM seen WHERE ts_ms < ?", (before_ms,))
        return int(cur.rowcount)

    # -- texts shown, by (sender, app id) (docs/groups.md) --------------------------
    # After a branch switch a member re-sends its texts of the losing branch with the
    # same app id; a member that showed the original must not show the copy, also
    # after a restart. The key is an HMAC so the file does not tell who sent what.
    def _text_key(self, sender: bytes, app_id: bytes) -> bytes:
        return hmac.new(self._seen_key, sender + app_id, hashlib.sha256).digest()[:16]

    def _saw_text(self, sender: bytes, app_id: bytes, now_ms: int) -> None:
        if app_id:
            self._conn.execute(
                "INSERT OR IGNORE INTO seen_texts (key, expiry_ms) VALUES (?, ?)",
                (self._text_key(sender, app_id), now_ms + TEXT_SEEN_KEEP_MS),
            )

    def text_seen(self, sender: bytes, app_id: bytes) -> bool:
        """Was a text with this (sender, app id) shown already? Texts without an id
        (older senders) are never duplicates."""
        if not app_id:
            return False
        row = self._conn.execute(
            "SELECT 1 FROM seen_texts WHERE key = ?", (self._text_key(sender, app_id),)
        ).fetchone()
        return row is not None

    # -- branch switches (qpc_node/client/branch_store.py, docs/groups.md) -------------
    def branch_groups(self) -> list[bytes]:
        rows = self._conn.execute("SELECT group_id FROM group_branches").fetchall()
        return [bytes(g) for (g,) in rows]

    def branch_record(self, group_id: bytes) -> BranchRecord | None:
        """The group's record; ClientStateError when it does not open (tampered)."""
        row = self._conn.execute(
            "SELECT state, trial, texts_seq FROM group_branches WHERE group_id = ?", (group_id,)
        ).fetchone()
        if row is None:
            return None
        state = self._open(bytes(row[0]), b"branches" + group_id)
        return BranchRecord(group_id, state, None if row[1] is None else int(row[1]), int(row[2]))

    def branch_save(
        self,
        group_id: bytes,
        state: bytes,
        *,
        live_tags: list[bytes],
        resend: list[bytes] | None = None,
        recipients: Mapping[bytes, Collection[bytes]] | None = None,
        trial: int | None = None,
        outbox: Collection[tuple[bytes, bytes]] = (),
        now_ms: int = 0,
    ) -> None:
        """Record the group's branch state, in one transaction with what follows from
        it: the texts of ``resend`` (app ids, a switch's) become pending resends, each
        with the members it went to (``recipients``, by app id), texts of epochs not in
        ``live_tags`` (the live path and the rejoin history: a branch that lost is in
        neither) are forgotten (never resent), the trial marker is set to ``trial``
        (None: cleared, the state matches the MLS group), and ``outbox`` ((msg_id,
        envelope), a rejoin's external commit) is queued, due at ``now_ms``."""
        sealed = self._seal(state, b"branches" + group_id)
        marks = ",".join("?" * len(live_tags))
        who = recipients or {}
        with transaction(self._conn):
            self._conn.execute(
                "INSERT OR REPLACE INTO group_branches (group_id, state, trial, texts_seq)"
                " VALUES (?, ?, ?,"
                " (SELECT coalesce(max(seq), 0) FROM branch_texts WHERE group_id = ?))",
                (group_id, sealed, trial, group_id),
            )
            self._conn.executemany(
                "INSERT OR IGNORE INTO branch_resends (group_id, app_id, body, recipients)"
                " SELECT group_id, app_id, body, ? FROM branch_texts"
                " WHERE group_id = ? AND app_id = ?",
                [
                    (
                        self._seal(b"".join(sorted(who.get(a, ()))), b"recipients" + group_id + a),
                        group_id,
                        a,
                    )
                    for a in resend or ()
                ],
            )
            self._conn.execute(
                f"DELETE FROM branch_texts WHERE group_id = ? AND tag NOT IN ({marks})",
                (group_id, *live_tags),
            )
            self._queue(outbox, now_ms)

    def branch_trial(self, group_id: bytes, snapshot: int) -> bool:
        """Journal ``snapshot`` as the state to return to if the MLS change that follows
        is not recorded (``branch_save``) before a crash; False when the group has no
        record yet (then save one with ``trial`` set)."""
        cur = self._conn.execute(
            "UPDATE group_branches SET trial = ? WHERE group_id = ?", (snapshot, group_id)
        )
        return cur.rowcount == 1

    def branch_drop(self, group_id: bytes, *, resends: bool = False) -> None:
        """Forget the group's record and texts (a bad record, or the group is gone);
        ``resends``: its pending resends too."""
        with transaction(self._conn):
            self._conn.execute("DELETE FROM group_branches WHERE group_id = ?", (group_id,))
            self._conn.execute("DELETE FROM branch_texts WHERE group_id = ?", (group_id,))
            if resends:
                self._conn.execute("DELETE FROM branch_resends WHERE group_id = ?", (group_id,))
                self._conn.execute("DELETE FROM branch_owed WHERE group_id = ?", (group_id,))

    def branch_text_add(
        self, group_id: bytes, app_id: bytes, tag: bytes, body: bytes, now_ms: int
    ) -> None:
        """We sent text ``app_id`` (``body``: its AppMessage) in the epoch ``tag``: kept
        (sealed) for a resend, the newest MAX_BRANCH_TEXTS per group.

        Committed without an fsync of its own (``synchronous = NORMAL`` for this one
        transaction): the text's envelopes are queued next on this connection, and that
        commit's fsync (FULL) makes this one durable too, since a WAL is synced as a
        whole and in order. So a text costs one fsync, not two. A process crash loses
        nothing (the frames are written); only a power loss before the outbox commit can
        take the row away, and then the envelopes were never queued either: the text
        was not sent, so there is nothing to resend. The write stays here, in the MLS
        worker call that encrypted the text, so it is ordered before any branch switch
        that must find it (``branch_save`` makes it a pending resend)."""
        sealed = self._seal(body, b"text" + group_id + app_id)
        self._conn.execute("PRAGMA synchronous = NORMAL")
        try:
            with transaction(self._conn):
                self._conn.execute(
                    "INSERT OR IGNORE INTO branch_texts (group_id, app_id, tag, body, sent_ms)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (group_id, app_id, tag, sealed, now_ms),
                )
                self._conn.execute(
                    "DELETE FROM branch_texts WHERE group_id = ? AND seq NOT IN"
                    " (SELECT seq FROM branch_texts WHERE group_id = ?"
                    " ORDER BY seq DESC LIMIT ?)",
                    (group_id, group_id, MAX_BRANCH_TEXTS),
                )
        finally:
            self._conn.execute("PRAGMA synchronous = FULL")

    def branch_text_bodies(self, group_id: bytes, app_ids: list[bytes]) -> list[bytes]:
        """The AppMessages of our kept texts ``app_ids`` (those still kept), in their
        order of sending; one that does not open (tampered) is left out."""
        out: list[tuple[int, bytes]] = []
        for app_id in app_ids:
            row = self._conn.execute(
                "SELECT seq, body FROM branch_texts WHERE group_id = ? AND app_id = ?",
                (group_id, app_id),
            ).fetchone()
            if row is None:
                continue
            try:
                out.append((int(row[0]), self._open(bytes(row[1]), b"text" + group_id + app_id)))
            except ClientStateError:
                continue
        return [body for _seq, body in sorted(out)]

    def branch_texts_after(self, group_id: bytes, seq: int) -> list[BranchText]:
        rows = self._conn.execute(
            "SELECT seq, app_id, tag FROM branch_texts WHERE group_id = ? AND seq > ? ORDER BY seq",
            (group_id, seq),
        ).fetchall()
        return [BranchText(int(q), bytes(a), bytes(t)) for q, a, t in rows]

    def branch_resends(self) -> list[PendingResend]:
        """Resends a switch decided and not queued yet, oldest first. One whose body or
        recipients do not open (tampered) is dropped."""
        rows = self._conn.execute(
            "SELECT rowid, group_id, app_id, body, recipients FROM branch_resends ORDER BY rowid"
        ).fetchall()
        out: list[PendingResend] = []
        for rowid, g, a, body, who in rows:
            gid, app_id = bytes(g), bytes(a)
            try:
                plain = self._open(bytes(body), b"text" + gid + app_id)
                to = b"" if who is None else self._open(bytes(who), b"recipients" + gid + app_id)
            except ClientStateError:
                self._conn.execute("DELETE FROM branch_resends WHERE rowid = ?", (rowid,))
                continue
            out.append(PendingResend(gid, app_id, plain, _split_fingerprints(to)))
        return out

    def resend_queued(
        self,
        group_id: bytes,
        app_id: bytes,
        items: list[tuple[bytes, bytes]],
        now_ms: int,
        *,
        owed: Collection[bytes] = (),
    ) -> None:
        """A pending resend's envelopes go into the outbox and the resend is forgotten,
        in one transaction: after a crash it is either still pending (encrypted again:
        the first ciphertext never left) or queued, never both. Its recipients on the
        losing branch that the winner does not hold (``owed``) are owed it from then on,
        in the same transaction (``branch_owed``)."""
        with transaction(self._conn):
            self._queue(items, now_ms)
            self._conn.executemany(
                "INSERT OR IGNORE INTO branch_owed (group_id, member, app_id, body, owed_ms)"
                " SELECT group_id, ?, app_id, body, ? FROM branch_resends"
                " WHERE group_id = ? AND app_id = ?",
                [(m, now_ms, group_id, app_id) for m in owed],
            )
            self._conn.execute(
                "DELETE FROM branch_resends WHERE group_id = ? AND app_id = ?", (group_id, app_id)
            )

    def branch_owed(self, group_id: bytes, members: Collection[bytes]) -> list[OwedText]:
        """Our texts owed to ``members`` in the group, oldest first (a row that does not
        open, tampered, is dropped)."""
        out: list[OwedText] = []
        for member in members:
            rows = self._conn.execute(
                "SELECT rowid, app_id, body FROM branch_owed"
                " WHERE group_id = ? AND member = ? ORDER BY owed_ms, rowid",
                (group_id, member),
            ).fetchall()
            for rowid, a, body in rows:
                app_id = bytes(a)
                try:
                    plain = self._open(bytes(body), b"text" + group_id + app_id)
                except ClientStateError:
                    self._conn.execute("DELETE FROM branch_owed WHERE rowid = ?", (rowid,))
                    continue
                out.append(OwedText(member, app_id, plain))
        return out

    def owed_queued(
        self,
        group_id: bytes,
        member: bytes,
        app_ids: Collection[bytes],
        items: list[tuple[bytes, bytes]],
        now_ms: int,
    ) -> None:
        """Owed texts' envelopes go into the outbox and the debts are forgotten, in one
        transaction (as ``resend_queued``: sent exactly once across a crash)."""
        with transaction(self._conn):
            self._queue(items, now_ms)
            self._conn.executemany(
                "DELETE FROM branch_owed WHERE group_id = ? AND member = ? AND app_id = ?",
                [(group_id, member, a) for a in app_ids],
            )

    def prune_branch_state(self, now_ms: int, text_max_age_ms: int) -> int:
        """Forget shown texts' ids past their expiry, our texts older than any of their
        copies can live (their resend could no longer be told from a new text), and
        texts owed that long to a member no commit added back."""
        with transaction(self._conn):
            n = self._conn.execute("DELETE FROM seen_texts WHERE expiry_ms < ?", (now_ms,)).rowcount
            n += self._conn.execute(
                "DELETE FROM branch_texts WHERE sent_ms < ?", (now_ms - text_max_age_ms,)
            ).rowcount
            n += self._conn.execute(
                "DELETE FROM branch_owed WHERE owed_ms < ?", (now_ms - text_max_age_ms,)
            ).rowcount
        return int(n)

    def unshown(self) -> list[Received]:
        """Received texts not yet shown, oldest first; marks them shown."""
        rows = self._conn.execute(
            "SELECT id, seq, conv, sealed, ts_ms FROM inbox WHERE shown = 0 ORDER BY id"
        ).fetchall()
        out: list[Received] = []
        for rid, seq, conv, sealed, ts in rows:
            plain = self._open(bytes(sealed), conv.encode("utf-8"))
            out.append(Received(rid, seq, conv, plain[:32], plain[32:].decode("utf-8"), ts))
        if out:
            self._conn.execute(
                "UPDATE inbox SET shown = 1 WHERE id <= ? AND shown = 0", (out[-1].id,)
            )
        return out

    # -- outbox --------------------------------------------------------------
    def outbox_add(self, msg_id: bytes, envelope: bytes, now_ms: int) -> None:
        self.outbox_add_many([(msg_id, envelope)], now_ms)

    def _queue(self, items: Iterable[tuple[bytes, bytes]], now_ms: int) -> None:
        """Put (msg_id, envelope) rows into the outbox, due at ``now_ms``, inside the
        caller's transaction (an id already queued stays as it is)."""
        self._conn.executemany(
            "INSERT OR IGNORE INTO outbox (msg_id, envelope, next_ms, created_ms)"
            " VALUES (?, ?, ?, ?)",
            [(m, e, now_ms, now_ms) for m, e in items],
        )

    def outbox_add_many(self, items: list[tuple[bytes, bytes]], now_ms: int) -> None:
        """Queue envelopes (one transaction: a group fan-out is one fsync, not one each)."""
        with transaction(self._conn):
            self._queue(items, now_ms)

    def outbox_due(self, now_ms: int, limit: int = 64) -> list[Outgoing]:
        rows = self._conn.execute(
            "SELECT o.msg_id, o.envelope, o.attempts, o.next_ms, c.commit_id FROM outbox o"
            " LEFT JOIN commit_msgs c ON c.msg_id = o.msg_id WHERE o.next_ms <= ?"
            " ORDER BY o.created_ms LIMIT ?",
            (now_ms, limit),
        ).fetchall()
        return [
            Outgoing(bytes(m), bytes(e), a, n, None if c is None else bytes(c))
            for m, e, a, n, c in rows
        ]

    # -- pending commits -------------------------------------------------------
    def commit_begin(
        self,
        commit_id: bytes,
        group_id: bytes,
        followup: bytes | None,
        items: list[tuple[bytes, bytes]],
        now_ms: int,
        *,
        welcome: bytes | None = None,
        roster: tuple[bytes, ...] = (),
    ) -> None:
        """Queue a commit's fan-out and remember which messages belong to it (one
        transaction: after a crash the outbox and the record agree)."""
        with transaction(self._conn):
            self._conn.execute(
                "INSERT INTO pending_commits"
                " (commit_id, group_id, followup, created_ms, welcome, roster)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (commit_id, group_id, followup, now_ms, welcome, b"".join(roster)),
            )
            self._conn.executemany(
                "INSERT INTO outbox (msg_id, envelope, next_ms, created_ms) VALUES (?, ?, ?, ?)",
                [(m, e, now_ms, now_ms) for m, e in items],
            )
            self._conn.executemany(
                "INSERT INTO commit_msgs (msg_id, commit_id) VALUES (?, ?)",
                [(m, commit_id) for m, _ in items],
            )

    def outbox_of_commit(self, commit_id: bytes) -> list[Outgoing]:
        rows = self._conn.execute(
            "SELECT o.msg_id, o.envelope, o.attempts, o.next_ms FROM outbox o"
            " JOIN commit_msgs c ON c.msg_id = o.msg_id WHERE c.commit_id = ?"
            " ORDER BY o.created_ms, o.rowid",
            (commit_id,),
        ).fetchall()
        return [Outgoing(bytes(m), bytes(e), a, n, commit_id) for m, e, a, n in rows]

    def pending_commits(self) -> list[CommitRecord]:
        rows = self._conn.execute(
            "SELECT p.commit_id, p.group_id, p.followup, p.cancelled,"
            " (SELECT count(*) FROM commit_msgs c JOIN outbox o ON o.msg_id = c.msg_id"
            "  WHERE c.commit_id = p.commit_id), p.welcome, p.roster"
            " FROM pending_commits p ORDER BY p.created_ms, p.rowid"
        ).fetchall()
        return [
            CommitRecord(
                bytes(c),
                bytes(g),
                None if f is None else bytes(f),
                bool(x),
                int(n),
                None if w is None else bytes(w),
                _split_fingerprints(bytes(r or b"")),
            )
            for c, g, f, x, n, w, r in rows
        ]

    def pending_commit(self, commit_id: bytes) -> CommitRecord | None:
        return next((p for p in self.pending_commits() if p.commit_id == commit_id), None)

    def commit_cancel(self, commit_id: bytes) -> None:
        """The node refused the fan-out for good: unqueue all of it, mark it cancelled
        (one transaction, before the MLS commit is cleared: it is never sent again)."""
        with transaction(self._conn):
            self._conn.execute(
                "DELETE FROM outbox WHERE msg_id IN"
                " (SELECT msg_id FROM commit_msgs WHERE commit_id = ?)",
                (commit_id,),
            )
            self._conn.execute(
                "UPDATE pending_commits SET cancelled = 1 WHERE commit_id = ?", (commit_id,)
            )

    def commit_finished(
        self, commit_id: bytes, followups: list[tuple[bytes, bytes]], now_ms: int
    ) -> None:
        """Forget a merged (or cleared) commit and queue its follow-ups, atomically, so a
        crash can neither lose the follow-up nor queue it twice."""
        with transaction(self._conn):
            self._queue(followups, now_ms)
            self._conn.execute("DELETE FROM commit_msgs WHERE commit_id = ?", (commit_id,))
            self._conn.execute("DELETE FROM pending_commits WHERE commit_id = ?", (commit_id,))

    def outbox_retry_at(self, msg_id: bytes, next_ms: int) -> None:
        self._conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_ms = ? WHERE msg_id = ?",
            (next_ms, msg_id),
        )

    def outbox_retry_many(self, items: list[tuple[bytes, int]]) -> None:
        """Schedule each ``(msg_id, next_ms)`` again, one transaction for all."""
        with transaction(self._conn):
            self._conn.executemany(
                "UPDATE outbox SET attempts = attempts + 1, next_ms = ? WHERE msg_id = ?",
                [(n, m) for m, n in items],
            )

    def outbox_done(self, msg_ids: list[bytes]) -> None:
        with transaction(self._conn):
            self._conn.executemany("DELETE FROM outbox WHERE msg_id = ?", [(m,) for m in msg_ids])

    def outbox_due_now(self, now_ms: int) -> int:
        """Make every queued message due (the connection is back: its backoff is moot)."""
        cur = self._conn.execute(
            "UPDATE outbox SET next_ms = ? WHERE next_ms > ?", (now_ms, now_ms)
        )
        return int(cur.rowcount)

    def outbox_len(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM outbox").fetchone()[0])


class AsyncClientState:
    """Runs ClientState calls on a worker thread, one at a time (never on the Trio thread)."""

    def __init__(self, state: ClientState) -> None:
        self.sync = state
        self._limiter = trio.CapacityLimiter(1)
        self._lock = threading.Lock()
        """One connection, one user at a time: the state thread, or the MLS worker
        thread journalling a branch switch between two MLS changes (``blocking``)."""

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await trio.to_thread.run_sync(
            functools.partial(self.blocking, fn, *args, **kwargs), limiter=self._limiter
        )

    def blocking(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args)`` on the calling thread (never the Trio thread): for the MLS
        worker, whose branch journal must be written between two MLS calls of one
        worker call (qpc_node/client/branches.py)."""
        with self._lock:
            return fn(*args, **kwargs)


def _split_fingerprints(blob: bytes) -> tuple[bytes, ...]:
    return tuple(blob[i : i + 32] for i in range(0, len(blob) - len(blob) % 32, 32))

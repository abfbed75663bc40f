"""What the user agent's parts share: its error, a received text, its counters,
and the context (identity, state, session, MLS worker, clock) each part works with.

Its own module so the parts (outbox, inbox, keypackages) and the ``Agent`` facade
that wires them import these without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from qpc_node import crypto
from qpc_node.client.mls_worker import MlsWorker
from qpc_node.client.state import AsyncClientState
from qpc_node.errors import QpcError, StatusCode
from qpc_node.rpc.client import RpcClient


class AgentError(QpcError):
    code = StatusCode.FAILED_PRECONDITION


class Incoming(msgspec.Struct, frozen=True):
    seq: int
    conversation: str
    sender: str  # fingerprint hex
    text: str
    app_id: bytes = b""
    """The sender's id of a group text (remembered when stored: a resend shows once)."""


class AgentStatistics(msgspec.Struct):
    sent: int = 0
    received: int = 0
    undecryptable: int = 0
    """Delivered messages that can never be processed (bad encoding, signature, an
    epoch we left): counted, reported with a warning, then discarded."""
    held: int = 0
    """Messages kept in client.db right now because they cannot be processed yet."""
    recovered: int = 0
    """Held messages that were processed later (their commit or Welcome arrived)."""
    held_expired: int = 0
    """Held messages given up: expired, or over MAX_HELD."""
    send_retries: int = 0
    """Outbox messages scheduled again (node busy, connection lost)."""
    send_dropped: int = 0
    """Outbox messages the node refused for good (or that expired unsent)."""
    duplicates: int = 0
    """Delivered messages already received before (a retried send, or a copy another
    node delivered after we moved): skipped, never shown twice."""
    channel_forged: int = 0
    """Channel messages sealed under the channel key but not signed by the sender they
    name (a member forging another's): dropped."""
    channel_tampered: int = 0
    """Channel messages that failed the AEAD (wrong key, changed in transit) or were
    malformed: dropped."""
    gaps: list[tuple[int, int]] = msgspec.field(default_factory=list)
    """(expected, got) sequence pairs where messages went missing."""
    warnings: list[str] = msgspec.field(default_factory=list)


class Warn(Protocol):
    """``warn(message for the user, log event)``: kept in the statistics, logged, shown."""

    def __call__(self, msg: str, event: str = ...) -> None: ...


class AgentContext(msgspec.Struct, frozen=True):
    """What every part of one identity's agent works with; built once by ``Agent``."""

    ident: crypto.Identity
    state: AsyncClientState
    rpc: RpcClient
    mls: MlsWorker
    wall_ms: Callable[[], int]
    stats: AgentStatistics
    warn: Warn
    node: Callable[[], bytes] = lambda: b""
    """The node the session is on now (its mesh id; b"" before the first login): its
    mailbox numbers what we fetch, so cursors and held messages are kept per node."""


class AgentPart:
    """Base of the agent's parts: the context as attributes, named as in ``Agent``."""

    def __init__(self, ctx: AgentContext) -> None:
        self._ident = ctx.ident
        self._state = ctx.state
        self._st = ctx.state.sync
        self._rpc = ctx.rpc
        self._mls = ctx.mls
        self._wall_ms = ctx.wall_ms
        self._stats = ctx.stats
        self._warn = ctx.warn
        self._node = ctx.node

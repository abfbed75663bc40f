"""Mailbox fairness: may this sender still put mail into this mailbox? A pure decision.

Why it exists: a mailbox has one quota (10,000 messages by default). Without a policy,
anyone with a fresh key filled a user's mailbox in 0.7 s and the user's contacts were
refused until the user fetched and acked. Keys are free (a Sybil attacker makes as many
as it likes), so a cap per sender alone protects nobody. What protects the contacts is
splitting the quota by whether the *recipient* has accepted the sender:

* an **accepted** sender -- one the recipient has itself sent to (the home node sees
  that on the recipient's own authenticated enqueue) -- may use the whole mailbox;
* every other sender, a **stranger**, shares a bounded *stranger pool* (10 % of the
  mailbox by default), and inside that pool each stranger has a bounded *share* (a
  tenth of the pool, but never less than one maximal payload), so one stranger cannot
  take the whole pool and no number of strangers can take more than the pool. The
  recipient's contacts therefore always keep 90 % of the mailbox.

The rule lives here, apart from SQLite, so it can be tested on many cases: it takes
counts and returns a refusal or ``None``. The store reads the counts in the same
transaction in which it writes, so two batches can never both take the last slot.

The *sender* is a :class:`SenderKey`, not a fingerprint: today it is the authenticated
session of a local user; for traffic a neighbour node relays (the mesh, not built yet)
it is the neighbour's node fingerprint plus the origin that neighbour declares, and the
same decision applies to it unchanged.
"""

from __future__ import annotations

import enum

import msgspec

from qpc_node.store.errors import InvalidRecord
from qpc_node.store.records import FINGERPRINT_LEN

DEFAULT_POOL_PERCENT = 10
"""Share of the mailbox (messages and bytes) that all strangers together may hold."""

DEFAULT_SHARES = 10
"""The stranger pool is split into this many per-sender shares (so at least this many
strangers fit in it at once; a Sybil attacker needs this many keys to fill it)."""


class SenderKey(msgspec.Struct, frozen=True):
    """Who puts an envelope into a mailbox, as far as this node can tell.

    ``origin`` is the user fingerprint the envelope comes from: the proven session
    identity for a local sender; for relayed traffic, the origin the neighbour
    *declares* (this node cannot check it; see docs/threat-model.md). ``via`` is the
    relaying neighbour's node fingerprint, empty for a local sender. The pair is the
    unit of the per-sender share, so one neighbour's strangers do not share one share
    with strangers from elsewhere, and a neighbour is never mistaken for a local user.
    """

    origin: bytes
    via: bytes = b""

    def __post_init__(self) -> None:
        if len(self.origin) != FINGERPRINT_LEN:
            raise InvalidRecord(f"sender origin must be {FINGERPRINT_LEN} bytes")
        if self.via and len(self.via) != FINGERPRINT_LEN:
            raise InvalidRecord(f"relaying node must be {FINGERPRINT_LEN} bytes or none")

    @classmethod
    def local(cls, user: bytes) -> SenderKey:
        """A user who proved its key to this node on the calling session."""
        return cls(user)

    @classmethod
    def relayed(cls, neighbour: bytes, origin: bytes) -> SenderKey:
        """An envelope a neighbour node relays, from the origin it declares."""
        if not neighbour:
            raise InvalidRecord("a relayed sender needs the relaying node")
        return cls(origin, neighbour)

    @property
    def is_local(self) -> bool:
        return not self.via

    def tag(self) -> bytes:
        """Stored form: 32 bytes for a local user, 64 (node, origin) for relayed mail."""
        return self.via + self.origin

    def accepted_by_default(self, recipient: bytes) -> bool:
        """Your own mail to yourself is accepted -- but only from your own session: a
        neighbour declaring the recipient as origin gets no such trust."""
        return self.is_local and self.origin == recipient


class Usage(msgspec.Struct, frozen=True):
    """Unacked messages and their bytes (of a mailbox, a pool, or one sender)."""

    messages: int = 0
    bytes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.messages + other.messages, self.bytes + other.bytes)


class FairnessLimits(msgspec.Struct, frozen=True):
    """The three ceilings one decision checks against."""

    mailbox: Usage
    stranger_pool: Usage
    stranger_share: Usage

    @classmethod
    def derive(
        cls,
        *,
        mailbox_messages: int,
        mailbox_bytes: int,
        max_payload_bytes: int,
        pool_percent: int = DEFAULT_POOL_PERCENT,
        shares: int = DEFAULT_SHARES,
    ) -> FairnessLimits:
        """Ceilings from the mailbox quota, so an operator changing the quota keeps the split.

        ``pool_percent`` 0 refuses strangers altogether (contacts-only mailboxes). Byte
        ceilings never go below one maximal payload (capped by the mailbox itself): a
        stranger's first message may be a large attachment, and a ceiling below the
        payload cap would refuse it however empty the mailbox is.
        """
        if not 0 <= pool_percent <= 100:
            raise ValueError("pool_percent must be 0..100")
        if shares < 1:
            raise ValueError("shares must be >= 1")
        mailbox = Usage(mailbox_messages, mailbox_bytes)
        if pool_percent == 0:
            return cls(mailbox, Usage(), Usage())
        big = min(max_payload_bytes, mailbox_bytes)
        pool = Usage(
            max(1, mailbox_messages * pool_percent // 100),
            max(mailbox_bytes * pool_percent // 100, big),
        )
        share = Usage(
            max(1, pool.messages // shares), min(pool.bytes, max(pool.bytes // shares, big))
        )
        return cls(mailbox, pool, share)


class Reason(enum.Enum):
    """Why an envelope was refused; the value is the metrics label."""

    MAILBOX_FULL = "mailbox_full"
    STRANGER_POOL_FULL = "stranger_pool_full"
    STRANGER_SHARE_USED = "stranger_share_used"


_WHAT = {
    Reason.MAILBOX_FULL: "mailbox",
    Reason.STRANGER_POOL_FULL: "pool for senders the recipient has not accepted,",
    Reason.STRANGER_SHARE_USED: "share of a sender the recipient has not accepted,",
}


class Refusal(msgspec.Struct, frozen=True):
    reason: Reason
    unit: str  # "messages" or "bytes": which ceiling was hit
    limit: int
    requested: int

    @property
    def what(self) -> str:
        return f"{_WHAT[self.reason]} {self.unit}"


class MailboxUsage(msgspec.Struct, frozen=True):
    """What one mailbox holds now, as the decision needs it."""

    total: Usage  # every unacked message
    strangers: Usage  # those from senders that were strangers when they were stored
    sender: Usage  # those of this sender stored as a stranger


def admit(
    limits: FairnessLimits, usage: MailboxUsage, adding: Usage, *, accepted: bool
) -> Refusal | None:
    """``None`` if ``adding`` may go in, else the first ceiling it would pass.

    The mailbox quota binds everyone. An accepted sender is bound by nothing else; a
    stranger's own share is checked before the pool so that the one who used up its
    share is told so, rather than blamed on a pool others filled.
    """
    checks: list[tuple[Reason, Usage, Usage]] = [(Reason.MAILBOX_FULL, usage.total, limits.mailbox)]
    if not accepted:
        checks += [
            (Reason.STRANGER_SHARE_USED, usage.sender, limits.stranger_share),
            (Reason.STRANGER_POOL_FULL, usage.strangers, limits.stranger_pool),
        ]
    for reason, used, ceiling in checks:
        after = used + adding
        if after.messages > ceiling.messages:
            return Refusal(reason, "messages", ceiling.messages, after.messages)
        if after.bytes > ceiling.bytes:
            return Refusal(reason, "bytes", ceiling.bytes, after.bytes)
    return None

"""The mailbox fairness rule as a pure function: ceilings, order, keys, and the promise
that a flood of strangers (any number of keys) never takes a contact's room."""

from __future__ import annotations

import random

import pytest

from qpc_node.store.errors import InvalidRecord
from qpc_node.store.fairness import (
    FairnessLimits,
    MailboxUsage,
    Reason,
    Refusal,
    SenderKey,
    Usage,
    admit,
)

MIB = 1024 * 1024
ALICE = b"\xaa" * 32
BOB = b"\xbb" * 32
NODE = b"\x99" * 32

# A mailbox of 100 messages / 100 KiB, payload cap 4 KiB: pool 10 messages / 10 KiB,
# shares of 1 message / 4 KiB (a tenth of the pool, raised to one payload).
SMALL = FairnessLimits.derive(
    mailbox_messages=100, mailbox_bytes=100 * 1024, max_payload_bytes=4096
)


def usage(
    total: tuple[int, int], strangers: tuple[int, int] = (0, 0), sender: tuple[int, int] = (0, 0)
) -> MailboxUsage:
    return MailboxUsage(Usage(*total), Usage(*strangers), Usage(*sender))


# -- the ceilings ------------------------------------------------------------------


def test_default_split_of_the_default_quota() -> None:
    lim = FairnessLimits.derive(
        mailbox_messages=10_000, mailbox_bytes=64 * MIB, max_payload_bytes=5 * MIB
    )
    assert lim.mailbox == Usage(10_000, 64 * MIB)
    assert lim.stranger_pool == Usage(1_000, 64 * MIB // 10)
    # A tenth of the pool's bytes is below one payload: a stranger may still send one.
    assert lim.stranger_share == Usage(100, 5 * MIB)


def test_small_limits() -> None:
    assert SMALL.stranger_pool == Usage(10, 10 * 1024)
    assert SMALL.stranger_share == Usage(1, 4096)


@pytest.mark.parametrize(
    ("messages", "size", "payload", "pool", "share"),
    [
        (3, 1000, 100, Usage(1, 100), Usage(1, 100)),  # at least one message, one payload
        (10_000, 1000, 5000, Usage(1000, 1000), Usage(100, 1000)),  # payload > mailbox
        (50, 10 * MIB, 1, Usage(5, MIB), Usage(1, MIB // 10)),
    ],
)
def test_floors_and_caps(messages: int, size: int, payload: int, pool: Usage, share: Usage) -> None:
    lim = FairnessLimits.derive(
        mailbox_messages=messages, mailbox_bytes=size, max_payload_bytes=payload
    )
    assert (lim.stranger_pool, lim.stranger_share) == (pool, share)
    assert lim.stranger_share.messages <= lim.stranger_pool.messages <= lim.mailbox.messages
    assert lim.stranger_share.bytes <= lim.stranger_pool.bytes <= lim.mailbox.bytes


def test_pool_zero_means_contacts_only() -> None:
    lim = FairnessLimits.derive(
        mailbox_messages=100, mailbox_bytes=MIB, max_payload_bytes=1024, pool_percent=0
    )
    refusal = admit(lim, usage((0, 0)), Usage(1, 10), accepted=False)
    assert refusal is not None and refusal.limit == 0
    assert admit(lim, usage((0, 0)), Usage(1, 10), accepted=True) is None


@pytest.mark.parametrize(("percent", "shares"), [(-1, 10), (101, 10), (10, 0)])
def test_nonsense_parameters_are_refused(percent: int, shares: int) -> None:
    with pytest.raises(ValueError):
        FairnessLimits.derive(
            mailbox_messages=10,
            mailbox_bytes=10,
            max_payload_bytes=1,
            pool_percent=percent,
            shares=shares,
        )


# -- the decision ------------------------------------------------------------------

ONE = Usage(1, 1000)

CASES = [
    # (accepted, total, strangers, sender, adding, expected)
    (True, (0, 0), (0, 0), (0, 0), ONE, None),
    (True, (99, 0), (10, 10240), (0, 0), ONE, None),  # a full pool does not bind contacts
    (True, (100, 0), (0, 0), (0, 0), ONE, Refusal(Reason.MAILBOX_FULL, "messages", 100, 101)),
    (
        True,
        (0, 100 * 1024),
        (0, 0),
        (0, 0),
        ONE,
        Refusal(Reason.MAILBOX_FULL, "bytes", 102400, 103400),
    ),
    (False, (0, 0), (0, 0), (0, 0), ONE, None),
    (False, (50, 0), (9, 0), (0, 0), ONE, None),  # the last slot of the pool
    (False, (50, 0), (10, 0), (0, 0), ONE, Refusal(Reason.STRANGER_POOL_FULL, "messages", 10, 11)),
    (
        False,
        (50, 0),
        (5, 9300),
        (0, 0),
        ONE,
        Refusal(Reason.STRANGER_POOL_FULL, "bytes", 10240, 10300),
    ),
    (False, (50, 0), (1, 0), (1, 0), ONE, Refusal(Reason.STRANGER_SHARE_USED, "messages", 1, 2)),
    (
        False,
        (0, 0),
        (0, 0),
        (0, 0),
        Usage(1, 4097),
        Refusal(Reason.STRANGER_SHARE_USED, "bytes", 4096, 4097),
    ),
    (False, (0, 0), (0, 0), (0, 0), Usage(1, 4096), None),  # exactly one payload fits
    # Own share before the pool: the one who used its share is told so.
    (False, (50, 0), (10, 0), (1, 0), ONE, Refusal(Reason.STRANGER_SHARE_USED, "messages", 1, 2)),
    # The mailbox before everything: nobody is blamed for a mailbox contacts filled.
    (False, (100, 0), (10, 0), (1, 0), ONE, Refusal(Reason.MAILBOX_FULL, "messages", 100, 101)),
    (
        False,
        (0, 0),
        (0, 0),
        (0, 0),
        Usage(2, 10),
        Refusal(Reason.STRANGER_SHARE_USED, "messages", 1, 2),
    ),
]


@pytest.mark.parametrize(("accepted", "total", "strangers", "sender", "adding", "expected"), CASES)
def test_admit(
    accepted: bool,
    total: tuple[int, int],
    strangers: tuple[int, int],
    sender: tuple[int, int],
    adding: Usage,
    expected: Refusal | None,
) -> None:
    assert admit(SMALL, usage(total, strangers, sender), adding, accepted=accepted) == expected


def test_refusal_names_what_was_hit() -> None:
    share = admit(SMALL, usage((0, 0), (0, 0), (1, 0)), ONE, accepted=False)
    assert (
        share is not None
        and share.what == "share of a sender the recipient has not accepted, messages"
    )
    full = admit(SMALL, usage((100, 0)), ONE, accepted=True)
    assert full is not None and full.what == "mailbox messages"


def test_more_usage_never_turns_a_refusal_into_admission() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        u = usage(
            (rng.randrange(0, 110), rng.randrange(0, 110 * 1024)),
            (rng.randrange(0, 12), rng.randrange(0, 12 * 1024)),
            (rng.randrange(0, 3), rng.randrange(0, 5000)),
        )
        add = Usage(rng.randrange(1, 3), rng.randrange(1, 5000))
        accepted = rng.random() < 0.5
        if admit(SMALL, u, add, accepted=accepted) is not None:
            more = MailboxUsage(u.total + ONE, u.strangers + ONE, u.sender + ONE)
            assert admit(SMALL, more, add, accepted=accepted) is not None
        elif not accepted:
            # A stranger that gets in would also get in as a contact.
            assert admit(SMALL, u, add, accepted=True) is None


def test_no_sybil_flood_takes_a_contacts_room() -> None:
    """Simulate interleaved sends of 1 contact and up to 200 Sybil keys into one mailbox
    (no fetch): strangers never hold more than the pool, each key no more than its
    share, and every contact message is admitted until the contacts alone fill the
    mailbox minus the pool."""
    rng = random.Random(11)
    for keys in (1, 10, 200):
        total = strangers = contacts = 0
        per: dict[int, int] = {}
        contact_refused_early = 0
        for _ in range(600):
            if rng.random() < 0.2:
                refusal = admit(SMALL, usage((total, 0)), Usage(1, 0), accepted=True)
                if refusal is None:
                    total += 1
                    contacts += 1
                elif contacts < SMALL.mailbox.messages - SMALL.stranger_pool.messages:
                    contact_refused_early += 1
            else:
                k = rng.randrange(keys)
                u = usage((total, 0), (strangers, 0), (per.get(k, 0), 0))
                if admit(SMALL, u, Usage(1, 0), accepted=False) is None:
                    total += 1
                    strangers += 1
                    per[k] = per.get(k, 0) + 1
            assert strangers <= SMALL.stranger_pool.messages
            assert max(per.values(), default=0) <= SMALL.stranger_share.messages
        assert contact_refused_early == 0
        assert strangers == min(keys, SMALL.stranger_pool.messages)


# -- who the sender is ---------------------------------------------------------------


def test_sender_keys() -> None:
    local = SenderKey.local(ALICE)
    relayed = SenderKey.relayed(NODE, ALICE)
    assert local.is_local and not relayed.is_local
    assert local.tag() == ALICE and relayed.tag() == NODE + ALICE
    assert local != relayed  # a neighbour never shares a local user's share
    assert SenderKey.relayed(b"\x98" * 32, ALICE).tag() != relayed.tag()


def test_only_your_own_session_is_accepted_by_default() -> None:
    assert SenderKey.local(ALICE).accepted_by_default(ALICE)
    assert not SenderKey.local(BOB).accepted_by_default(ALICE)
    # A neighbour declaring the recipient itself as origin gets no trust from that.
    assert not SenderKey.relayed(NODE, ALICE).accepted_by_default(ALICE)


@pytest.mark.parametrize(
    ("origin", "via"), [(b"", b""), (b"\x01" * 31, b""), (ALICE, b"\x01" * 33), (ALICE * 2, b"")]
)
def test_malformed_sender_keys_are_typed_errors(origin: bytes, via: bytes) -> None:
    with pytest.raises(InvalidRecord):
        SenderKey(origin, via)


def test_relayed_needs_a_neighbour() -> None:
    with pytest.raises(InvalidRecord):
        SenderKey.relayed(b"", ALICE)

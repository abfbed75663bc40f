"""Group-control messages in client.proto (GroupIntent, CommitPull): golden bytes, and
the driver's reading of a note (a malformed one is None, never a crash).

Fixtures live in ``tests/fixtures/wire/groups/``. If an encoding changed on purpose,
regenerate:

    QPC_REGEN_FIXTURES=1 .venv/bin/pytest tests/unit/test_groups_wire.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf.message import Message

from qpc_node.client.groups import note_from_pb, note_to_pb
from qpc_node.groups.core import IntentKind, IntentNote
from qpc_node.wire.gen.qpc.v1 import client_pb2 as C

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "groups"
REGEN = os.environ.get("QPC_REGEN_FIXTURES") == "1"
NOTE = IntentNote(bytes(range(16)), IntentKind.ADD, "ab" * 32, bytes(range(32)), 7)
MESSAGES: dict[str, Message] = {
    "app_intent_add": C.AppMessage(intent=note_to_pb(NOTE), sent_ms=1_800_000_000_000),
    "app_intent_leave": C.AppMessage(
        intent=C.GroupIntent(
            intent_id=b"\x01" * 16,
            kind=C.GroupIntent.LEAVE,
            proposal_ref=b"\x02" * 32,
            epoch=2**64 - 1,
        )
    ),
    "app_pull": C.AppMessage(pull=C.CommitPull(from_epoch=12)),
    "app_pull_zero": C.AppMessage(pull=C.CommitPull(from_epoch=0)),
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_bytes_are_pinned(name: str) -> None:
    data = MESSAGES[name].SerializeToString().hex()
    path = FIXTURES / f"{name}.hex"
    if REGEN:
        path.write_text(data + "\n")
    assert path.read_text().strip() == data


BRANCH_FIXTURES = {"sealed_mls_branch", "sealed_mls_no_branch"}
"""Pinned by tests/unit/test_groups_branch_wire.py (Sealed.branch), same directory."""
REJOIN_FIXTURES = {"branch_offer", "sealed_rejoin_offer"}
"""Pinned by tests/unit/test_client_rejoin.py (BranchOffer, Sealed.REJOIN_OFFER)."""


def test_no_stray_fixtures() -> None:
    expected = set(MESSAGES) | BRANCH_FIXTURES | REJOIN_FIXTURES
    assert {p.stem for p in FIXTURES.glob("*.hex")} == expected


def test_text_messages_encode_as_before() -> None:
    # The new oneof members take new numbers: a text AppMessage is what it was.
    assert C.AppMessage(text="hi", sent_ms=5).SerializeToString() == b"\n\x02hi \x05"


def test_note_round_trips() -> None:
    assert note_from_pb(note_to_pb(NOTE)) == NOTE
    leave = IntentNote(b"\x09" * 16, IntentKind.LEAVE, "", b"r", 0)
    assert note_from_pb(note_to_pb(leave)) == leave


@pytest.mark.parametrize(
    "pb",
    [
        C.GroupIntent(intent_id=b"\x01" * 16),  # no kind
        C.GroupIntent(intent_id=b"\x01" * 16, kind=99),  # unknown kind
        C.GroupIntent(intent_id=b"\x01" * 15, kind=C.GroupIntent.ADD, target=b"\x02" * 32),
        C.GroupIntent(intent_id=b"\x01" * 16, kind=C.GroupIntent.ADD, target=b"\x02" * 31),
    ],
)
def test_malformed_notes_are_none(pb: C.GroupIntent) -> None:
    assert note_from_pb(pb) is None

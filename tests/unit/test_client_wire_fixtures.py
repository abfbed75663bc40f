"""Golden bytes of the client-to-client messages inside an envelope's ciphertext
(proto/qpc/v1/client.proto): the Sealed wrapper of each kind and the AppMessage
bodies. Nodes never see these in clear, but two clients of different versions must
still read each other.

Fixtures live in ``tests/fixtures/wire/client/``; a deliberate change regenerates:

    QPC_REGEN_FIXTURES=1 .venv/bin/pytest tests/unit/test_client_wire_fixtures.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf.message import Message

from qpc_node.wire.gen.qpc.v1 import client_pb2

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "client"
REGEN = os.environ.get("QPC_REGEN_FIXTURES") == "1"
GID = bytes(range(16))
ME = bytes(range(32, 64))

MESSAGES: dict[str, Message] = {
    "sealed_mls_message": client_pb2.Sealed(
        kind=client_pb2.Sealed.MLS_MESSAGE, group_id=GID, data=b"\x00\x01\x00\x02mls"
    ),
    "sealed_welcome": client_pb2.Sealed(
        kind=client_pb2.Sealed.WELCOME, group_id=GID, data=b"\x00\x01\x00\x03welcome"
    ),
    # The GroupInfo follow-up of a Welcome: joiners hold other texts until they read it.
    "sealed_describes": client_pb2.Sealed(
        kind=client_pb2.Sealed.MLS_MESSAGE, group_id=GID, data=b"\x00\x01\x00\x02i", describes=True
    ),
    "app_text": client_pb2.AppMessage(text="hello team", sent_ms=1_800_000_000_000),
    # Stage B: a text's app id (re-sent with the same id after a fork; shown once).
    "app_text_id": client_pb2.AppMessage(
        text="hello team", sent_ms=1_800_000_000_000, app_id=bytes(range(16))
    ),
    # Both Sealed fields of issue 14: describes (4) and the branch tag (5).
    "sealed_describes_branch": client_pb2.Sealed(
        kind=client_pb2.Sealed.MLS_MESSAGE,
        group_id=GID,
        data=b"\x00\x01\x00\x02i",
        describes=True,
        branch=bytes(range(100, 116)),
    ),
    "app_info": client_pb2.AppMessage(
        info=client_pb2.GroupInfo(name="team", direct=False, committer=ME)
    ),
    "app_leave": client_pb2.AppMessage(leave=client_pb2.LeaveRequest()),
    # A rejoined member asks for the winner's texts after the fork (field 8, new).
    "app_catch_up": client_pb2.AppMessage(
        catch_up=client_pb2.CatchUp(since=bytes(range(100, 116)))
    ),
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_client_message_bytes_are_pinned(name: str) -> None:
    message = MESSAGES[name]
    data = message.SerializeToString(deterministic=True)
    path = FIXTURES / f"{name}.hex"
    if REGEN:
        FIXTURES.mkdir(parents=True, exist_ok=True)
        path.write_text(data.hex() + "\n")
    assert path.exists(), f"missing fixture {path.name}: regenerate with QPC_REGEN_FIXTURES=1"
    assert data == bytes.fromhex(path.read_text().strip()), f"encoding of {name} changed"
    assert type(message).FromString(data) == message


def test_no_stray_client_fixtures() -> None:
    assert {p.name for p in FIXTURES.glob("*.hex")} == {f"{n}.hex" for n in MESSAGES}


def test_an_older_reader_sees_the_follow_up_as_a_plain_message() -> None:
    """``describes`` is a new field: a reader without it parses the rest unchanged."""
    data = MESSAGES["sealed_describes"].SerializeToString(deterministic=True)
    old = client_pb2.Sealed.FromString(data)
    old.ClearField("describes")
    assert (old.kind, old.group_id) == (client_pb2.Sealed.MLS_MESSAGE, GID)

"""Golden bytes of the group envelope's branch tag (proto/qpc/v1/client.proto Sealed.branch).

The field is new (number 5; 4 is `describes`): a Sealed without it must keep its old bytes, and old bytes
must parse with an empty tag (older senders), so the golden pins both. Regenerate
deliberately with

    QPC_REGEN_FIXTURES=1 .venv/bin/pytest tests/unit/test_groups_branch_wire.py

Files live in tests/fixtures/wire/groups/ (lowercase hex, one line).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpc_node.groups.fork import BRANCH_TAG_LEN
from qpc_node.wire.gen.qpc.v1 import client_pb2

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "groups"
REGEN = os.environ.get("QPC_REGEN_FIXTURES") == "1"
GID = bytes(range(16))
TAG = bytes(range(200, 200 + BRANCH_TAG_LEN))
S = client_pb2.Sealed

MESSAGES: dict[str, bytes] = {
    "sealed_mls_branch": S(
        kind=S.MLS_MESSAGE, group_id=GID, data=b"mls-private-message", branch=TAG
    ).SerializeToString(),
    "sealed_mls_no_branch": S(
        kind=S.MLS_MESSAGE, group_id=GID, data=b"mls-private-message"
    ).SerializeToString(),
}


def golden(name: str, data: bytes) -> None:
    path = FIXTURES / f"{name}.hex"
    if REGEN:
        FIXTURES.mkdir(parents=True, exist_ok=True)
        path.write_text(data.hex() + "\n")
        return
    assert path.exists(), f"missing fixture {path.name}: regenerate with QPC_REGEN_FIXTURES=1"
    assert data == bytes.fromhex(path.read_text().strip()), (
        f"wire encoding of {name} changed; if deliberate, regenerate (QPC_REGEN_FIXTURES=1)"
    )


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_branch_bytes_are_pinned(name: str) -> None:
    golden(name, MESSAGES[name])


def test_pinned_sealed_decodes_with_and_without_tag() -> None:
    with_tag = S.FromString(bytes.fromhex((FIXTURES / "sealed_mls_branch.hex").read_text()))
    assert (with_tag.group_id, with_tag.data, with_tag.branch) == (GID, b"mls-private-message", TAG)
    old = S.FromString(bytes.fromhex((FIXTURES / "sealed_mls_no_branch.hex").read_text()))
    assert old.branch == b"" and old.kind == S.MLS_MESSAGE

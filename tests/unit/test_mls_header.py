"""The clear MLS header (group id, epoch) the agent reads to tell a message from a
future epoch (keep it) from one of a past epoch (invalid): real OpenMLS messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpc_node import crypto
from qpc_node.client.mlsheader import (
    PRIVATE_MESSAGE,
    PUBLIC_MESSAGE,
    InvalidMlsHeader,
    parse_header,
)


def test_reads_group_and_epoch_of_real_messages(tmp_path: Path) -> None:
    alice = crypto.Identity.create(tmp_path / "a", os.urandom(32), durable=False)
    bob = crypto.Identity.create(tmp_path / "b", os.urandom(32), durable=False)
    g = alice.create_group()
    commit, welcome = g.add([bob.key_package()])
    merge = getattr(g, "merge_pending_commit", None)
    if merge is not None:
        merge()
    gid = bytes(g.group_id)
    head = parse_header(commit)
    assert head.wire_format in (PUBLIC_MESSAGE, PRIVATE_MESSAGE)  # handshake encryption policy
    assert (head.group_id, head.epoch) == (gid, 0)
    assert not head.application
    app = parse_header(g.encrypt(b"hi"))
    assert (app.wire_format, app.group_id, app.epoch) == (PRIVATE_MESSAGE, gid, 1)
    assert app.application and app.content_type == 1
    with pytest.raises(InvalidMlsHeader, match="no epoch header"):
        parse_header(welcome)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "too short"),
        (b"\x00\x02\x00\x02\x00" + b"\x00" * 8, "unknown MLS version"),
        (b"\x00\x01\x00\x05\x00" + b"\x00" * 8, "no epoch header"),
        (b"\x00\x01\x00\x02\xc0" + b"\x00" * 16, "0b11"),
        (b"\x00\x01\x00\x02\x40\x05" + b"\x00" * 16, "minimal"),
        (b"\x00\x01\x00\x02\x41\x00" + b"\x00" * 300, "group id of 256"),
        (b"\x00\x01\x00\x02\x04abcd\x00\x00", "truncated"),
        (b"\x00\x01\x00\x02\x40", "truncated length"),
        (b"\x00\x01\x00\x02\x01a" + b"\x00" * 8, "truncated content type"),
    ],
)
def test_refuses_what_is_not_a_header(data: bytes, why: str) -> None:
    with pytest.raises(InvalidMlsHeader, match=why):
        parse_header(data)

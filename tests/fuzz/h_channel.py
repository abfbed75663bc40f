"""Broadcast channel messages: the relay decoder and a member's opener.

``channel.decode`` is what every node runs on a channel message from a client or a
neighbour (wire/channel.py): only a ChannelMessageError may come out, and whatever
it accepts must re-encode to a message it accepts alike. ``channel.open`` is what
a member runs on a fetched message (client/channels.py): decrypt, parse, verify; a
mutant must be refused as tampered or forged (typed), never crash, and what opens
must have been signed by the key it names.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from qpc_node import crypto
from qpc_node.client.channels import (
    ChannelOpenError,
    open_message,
    seal,
    signed_bytes,
)
from qpc_node.wire.channel import ChannelMessageError, ChannelPolicy, decode_channel_message
from tests.fuzz.registry import Invariant, environment, pure, register

NOW = 1_800_000_000_000
POLICY = ChannelPolicy()
SECRET = bytes(range(32))
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire" / "channel"


def _decode_seeds() -> list[bytes]:
    seeds = [
        bytes.fromhex(p.read_text().strip()) for p in sorted(FIXTURES.glob("channel_message.hex"))
    ]
    ident = _Signer()
    for body, hops in (("", 0), ("hi", 8), ("x" * 900, 16)):
        seeds.append(seal(SECRET, ident.key, ident.sign, body, now_ms=NOW, hop_limit=hops).encode())
    return seeds


class _Signer:
    """Seeds for the pure decoder need a sealed shape, not a valid signature."""

    key = b"\x07" * 32

    @staticmethod
    def sign(data: bytes) -> bytes:
        return bytes(64)


def decode_target(data: bytes) -> str:
    msg = decode_channel_message(data, NOW, POLICY)
    if decode_channel_message(msg.encode(), NOW, POLICY) != msg:
        raise Invariant("channel message does not round-trip")
    return "valid"


pure(
    "channel.decode",
    seeds=_decode_seeds,
    target=decode_target,
    allowed=(ChannelMessageError,),
)


@dataclass(slots=True)
class MemberEnv:
    ident: crypto.Identity


@environment("channel-member")
@contextlib.asynccontextmanager
async def member_env(tmp: Path) -> AsyncIterator[MemberEnv]:
    yield MemberEnv(crypto.Identity.create(tmp / "member", os.urandom(32), durable=False))


def _open_seeds(env: MemberEnv) -> list[bytes]:
    i = env.ident
    return [
        seal(SECRET, i.public_key, i.sign, body, now_ms=NOW).encode()
        for body in ("", "the bridge is closed", "ü" * 300)
    ]


def _open_target(env: MemberEnv) -> object:
    def run(data: bytes) -> str:
        msg = decode_channel_message(data, NOW, POLICY)
        opened = open_message(SECRET, msg)
        signed = signed_bytes(
            msg.channel_id, msg.msg_id, msg.expiry_ms, opened.created_ms, opened.body
        )
        try:
            crypto.verify(opened.sender_key, signed, b"\x00" * 64)
        except crypto.MlsError:
            pass
        else:
            raise Invariant("a zero signature verified")
        if opened.sender != crypto.fingerprint_of(opened.sender_key):
            raise Invariant("opened message names a sender other than its key")
        return "opened"

    return run


register(
    "channel.open",
    env="channel-member",
    seeds=_open_seeds,
    target=_open_target,
    allowed=(ChannelMessageError, ChannelOpenError),
)

"""Channel crypto (client/channels.py): the secret as text, id and key derivations,
seal/open with the sender's identity and signature inside the AEAD. A wrong key or
any change to the routing fields the AEAD binds is "tampered"; a member sealing a
message under another's name is "forged"; both typed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from msgspec.structs import replace

from qpc_node import crypto
from qpc_node.client.agent_types import AgentContext, AgentStatistics
from qpc_node.client.channels import (
    ChannelForged,
    Channels,
    ChannelSecretError,
    ChannelTampered,
    channel_id,
    channel_key,
    open_message,
    parse_secret,
    seal,
    secret_qr,
    secret_text,
    signed_bytes,
)
from qpc_node.client.mls_worker import MlsWorker
from qpc_node.client.state import AsyncClientState, ClientState
from qpc_node.rpc.client import RpcClient
from qpc_node.wire.channel import NONCE_LEN, ChannelMessage, ChannelPolicy, decode_channel_message
from qpc_node.wire.envelope import pad
from qpc_node.wire.gen.qpc.v1 import channel_pb2

NOW = 1_800_000_000_000
SECRET = bytes(range(32))


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> crypto.Identity:
    return crypto.Identity.create(tmp_path_factory.mktemp("a"), os.urandom(32), durable=False)


@pytest.fixture(scope="module")
def mallory(tmp_path_factory: pytest.TempPathFactory) -> crypto.Identity:
    return crypto.Identity.create(tmp_path_factory.mktemp("m"), os.urandom(32), durable=False)


def test_derivations_are_the_documented_ones() -> None:
    assert channel_id(SECRET) == hashlib.sha256(b"qpc-channel-id-v1" + SECRET).digest()
    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"qpc-channel-key-v1").derive(SECRET)
    assert channel_key(SECRET) == key
    assert channel_id(SECRET) != channel_key(SECRET)


def test_secret_text_round_trips_and_refuses_typed() -> None:
    text = secret_text(SECRET)
    assert text.startswith("qpcch:") and len(text) == 6 + 52
    assert parse_secret(text) == SECRET
    assert parse_secret("  " + text.upper().replace("QPCCH:", "qpcch:") + " ") == SECRET
    spaced = "qpcch:" + " ".join(text[6 + i : 6 + i + 4] for i in range(0, 52, 4))
    assert parse_secret(spaced) == SECRET
    for bad in ("", text[6:], "qpcch:" + "1" * 52, text[:-4], text + "aaaa", "qpc:" + text[6:]):
        with pytest.raises(ChannelSecretError):
            parse_secret(bad)
    assert "▀" in secret_qr(SECRET) or "▄" in secret_qr(SECRET) or "█" in secret_qr(SECRET)


def test_seal_and_open(alice: crypto.Identity) -> None:
    m = seal(SECRET, alice.public_key, alice.sign, "the bridge is closed", now_ms=NOW)
    # What a relay sees passes its checks and names neither the sender nor the text.
    assert decode_channel_message(m.encode(), NOW, ChannelPolicy()) == m
    assert alice.public_key not in m.sealed and b"bridge" not in m.sealed
    assert len(m.sealed) % 256 == NONCE_LEN + 16  # padded to a bucket
    opened = open_message(SECRET, m)
    assert (opened.sender, opened.body, opened.created_ms) == (
        alice.fingerprint,
        "the bridge is closed",
        NOW,
    )
    # Relays decrement the hop limit: not bound by the AEAD, the message still opens.
    assert open_message(SECRET, m.forwarded()).body == "the bridge is closed"


def test_wrong_key_is_tampered(alice: crypto.Identity) -> None:
    m = seal(SECRET, alice.public_key, alice.sign, "hi", now_ms=NOW)
    other = bytes(32)
    with pytest.raises(ChannelTampered):
        open_message(other, m)  # another channel's id
    with pytest.raises(ChannelTampered):
        open_message(other, replace(m, channel_id=channel_id(other)))  # right id, wrong key


@pytest.mark.parametrize("field", ["msg_id", "expiry_ms", "sealed", "nonce"])
def test_tampered_aad_or_ciphertext_is_tampered(alice: crypto.Identity, field: str) -> None:
    m = seal(SECRET, alice.public_key, alice.sign, "hi", now_ms=NOW)
    if field == "msg_id":
        bad = replace(m, msg_id=bytes(16))
    elif field == "expiry_ms":
        bad = replace(m, expiry_ms=m.expiry_ms + 1)  # a relay extending its life
    elif field == "sealed":
        bad = replace(m, sealed=m.sealed[:-1] + bytes([m.sealed[-1] ^ 1]))
    else:
        bad = replace(m, sealed=bytes([m.sealed[0] ^ 1]) + m.sealed[1:])
    with pytest.raises(ChannelTampered):
        open_message(SECRET, bad)


def _seal_raw(m_fields: dict[str, object], plaintext: bytes) -> bytes:
    nonce = os.urandom(NONCE_LEN)
    aad = (
        m_fields["channel_id"]  # type: ignore[operator]
        + m_fields["msg_id"]
        + int(m_fields["expiry_ms"]).to_bytes(8, "big")  # type: ignore[call-overload]
    )
    return nonce + ChaCha20Poly1305(channel_key(SECRET)).encrypt(nonce, pad(plaintext), aad)


def test_a_member_forging_another_sender_is_forged(
    alice: crypto.Identity, mallory: crypto.Identity
) -> None:
    """Mallory holds the secret (a member) and seals a message naming alice's key,
    signed with her own key: the AEAD holds, the signature does not."""
    m = seal(SECRET, alice.public_key, mallory.sign, "alice says: pay mallory", now_ms=NOW)
    with pytest.raises(ChannelForged):
        open_message(SECRET, m)
    # Reusing a real signature of alice for another body (or another msg_id) fails too.
    real = seal(SECRET, alice.public_key, alice.sign, "hello", now_ms=NOW)
    pt = channel_pb2.ChannelPlaintext(
        sender_key=alice.public_key,
        created_ms=NOW,
        body="goodbye",
        signature=alice.sign(
            signed_bytes(real.channel_id, real.msg_id, real.expiry_ms, NOW, "hello")
        ),
    ).SerializeToString()
    fields = {"channel_id": real.channel_id, "msg_id": real.msg_id, "expiry_ms": real.expiry_ms}
    forged = replace(real, sealed=_seal_raw(fields, pt))
    with pytest.raises(ChannelForged):
        open_message(SECRET, forged)
    # Garbage sealed under the right key: a member's doing, refused as forged.
    junk = replace(real, sealed=_seal_raw(fields, b"\xff\xff\xff"))
    with pytest.raises(ChannelForged):
        open_message(SECRET, junk)
    bad_key = channel_pb2.ChannelPlaintext(
        sender_key=b"\x01" * 5, signature=b"\x02"
    ).SerializeToString()
    with pytest.raises(ChannelForged):
        open_message(SECRET, replace(real, sealed=_seal_raw(fields, bad_key)))


# -- a member's receive path: replay shown once, forged/tampered dropped and counted ---


async def test_member_receive_path_dedupes_replays_and_counts_drops(
    tmp_path: Path, alice: crypto.Identity, mallory: crypto.Identity
) -> None:
    """``Channels`` on a real client.db (no node: fetched items are fed to the same
    per-message path receive runs)."""
    bob = crypto.Identity.create(tmp_path / "bob", os.urandom(32), durable=False)
    state = ClientState(tmp_path, os.urandom(32))
    warned: list[str] = []
    stats = AgentStatistics()
    ctx = AgentContext(
        bob,
        AsyncClientState(state),
        RpcClient(_no_node),
        MlsWorker(),
        lambda: NOW,
        stats,
        lambda msg, event="": warned.append(msg),
        lambda: b"node-1",
    )
    part = Channels(ctx)
    await part.join("news", SECRET)
    chans = {c.channel_id: c for c in state.channels()}

    def item(seq: int, m: ChannelMessage) -> channel_pb2.StoredChannelMessage:
        return channel_pb2.StoredChannelMessage(seq=seq, message=m.to_proto())

    hello = seal(SECRET, alice.public_key, alice.sign, "hello", now_ms=NOW)
    opened = await part._one(chans, b"node-1", item(1, hello))
    assert opened is not None and opened[0] == NOW  # its sealed creation time
    got = opened[1]
    assert (got.conversation, got.sender, got.text) == (
        "#news",
        alice.fingerprint,
        "hello",
    )
    # The same msg_id again (replayed, or another node's copy under another seq): once.
    assert await part._one(chans, b"node-1", item(2, hello)) is None
    assert await part._one(chans, b"node-1", item(3, hello.forwarded())) is None
    assert stats.duplicates == 2
    forged = seal(SECRET, alice.public_key, mallory.sign, "pay mallory", now_ms=NOW)
    assert await part._one(chans, b"node-1", item(4, forged)) is None
    other = seal(bytes(32), mallory.public_key, mallory.sign, "x", now_ms=NOW)
    wrong_key = replace(other, channel_id=channel_id(SECRET))
    assert await part._one(chans, b"node-1", item(5, wrong_key)) is None
    assert (stats.channel_forged, stats.channel_tampered) == (1, 1)
    assert len(warned) == 2
    # Dropped ones are not remembered as seen: a genuine copy of that id still shows.
    assert not state.seen(forged.msg_id)
    # Every item moved the channel's cursor; the text is in client.db, sealed.
    assert state.channel_cursors(b"node-1") == {channel_id(SECRET): 5}
    (r,) = state.unshown()
    assert (r.conv, r.sender, r.text) == ("#news", bytes.fromhex(alice.fingerprint), "hello")
    state.close()


async def _no_node() -> trio.abc.HalfCloseableStream:
    raise trio.ClosedResourceError("no node in this test")

"""Broadcast channels on the client: the secret, sealing and opening, and the agent part.

A channel is a 32-byte random secret shared out of band (text ``qpcch:`` + base32,
or its QR code). From it come the channel id nodes route on and the AEAD key only
members hold (proto/qpc/v1/channel.proto has the exact derivations). The sender's
identity key, the time and the body travel *inside* the AEAD, signed by the sender's
identity, so relays learn neither who wrote nor what; members check both:

- the AEAD fails (a wrong key, or any byte of the message or its routing fields
  changed): :class:`ChannelTampered`;
- the AEAD holds but the signature does not (a member forging another's message):
  :class:`ChannelForged`.

Both are dropped and counted in the agent's statistics. A message id seen before
(the same message from another node, or replayed) is shown once.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import struct
from collections.abc import Callable

import msgspec
import segno
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.message import DecodeError

from qpc_node import crypto
from qpc_node.client.agent_types import AgentContext, AgentError, AgentPart, Incoming
from qpc_node.client.state import JoinedChannel
from qpc_node.errors import LocalProtocolError, RemoteProtocolError, StatusCode
from qpc_node.ops.log import get_logger
from qpc_node.rpc.errors import RpcError
from qpc_node.wire.channel import (
    DEFAULT_HOP_LIMIT,
    NONCE_LEN,
    ChannelMessage,
    ChannelMessageError,
    ChannelPolicy,
    from_proto,
)
from qpc_node.wire.envelope import MSG_ID_LEN, pad, unpad
from qpc_node.wire.gen.qpc.v1 import channel_pb2, rpc_pb2

log = get_logger("qpc.client")

SECRET_LEN = 32
SECRET_PREFIX = "qpcch:"
ID_LABEL = b"qpc-channel-id-v1"
KEY_INFO = b"qpc-channel-key-v1"
SIG_LABEL = b"qpc-channel-sig-v1"
DEFAULT_TTL_MS = 24 * 3600 * 1000
"""A broadcast lives a day (nodes hold it at most their retention, 48 h by default)."""
MAX_BODY = 4096
"""Characters of one broadcast at most (sealed, it stays under the node's 16 KiB cap)."""
FETCH_PAGES = 8
"""Pages one receive reads at most (more waits for the next receive)."""


class ChannelSecretError(LocalProtocolError):
    """Not a channel secret (wrong prefix, length or encoding)."""


class ChannelOpenError(RemoteProtocolError):
    """A channel message a member must drop."""


class ChannelTampered(ChannelOpenError):
    """The AEAD failed: a wrong channel key, or the message was changed in transit."""


class ChannelForged(ChannelOpenError):
    """Sealed under the channel key but not signed by the key it names as its sender."""


def new_secret() -> bytes:
    return os.urandom(SECRET_LEN)


def secret_text(secret: bytes) -> str:
    """``qpcch:`` + lower-case base32 without padding (52 characters)."""
    _check_len(secret)
    return SECRET_PREFIX + base64.b32encode(secret).decode().rstrip("=").lower()


def parse_secret(text: str) -> bytes:
    """Inverse of :func:`secret_text`; tolerant of case, spaces and dashes."""
    s = "".join(ch for ch in text.strip().lower() if ch not in " -_")
    if not s.startswith(SECRET_PREFIX):
        raise ChannelSecretError(f"a channel secret starts with {SECRET_PREFIX!r}")
    body = s.removeprefix(SECRET_PREFIX).upper()
    try:
        secret = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raise ChannelSecretError("a channel secret is base32 after its prefix") from None
    _check_len(secret)
    return secret


def _check_len(secret: bytes) -> None:
    if len(secret) != SECRET_LEN:
        raise ChannelSecretError(f"a channel secret is {SECRET_LEN} bytes, got {len(secret)}")


def secret_qr(secret: bytes) -> str:
    """The secret's text as a QR code drawn with block characters (as ``/whoami``)."""
    buf = io.StringIO()
    segno.make(secret_text(secret), error="m").terminal(out=buf, compact=True)
    return buf.getvalue()


def channel_id(secret: bytes) -> bytes:
    return hashlib.sha256(ID_LABEL + secret).digest()


def channel_key(secret: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=KEY_INFO).derive(secret)


def _aad(cid: bytes, msg_id: bytes, expiry_ms: int) -> bytes:
    return cid + msg_id + struct.pack(">Q", expiry_ms)


def signed_bytes(cid: bytes, msg_id: bytes, expiry_ms: int, created_ms: int, body: str) -> bytes:
    return SIG_LABEL + _aad(cid, msg_id, expiry_ms) + struct.pack(">Q", created_ms) + body.encode()


class Opened(msgspec.Struct, frozen=True):
    sender_key: bytes
    sender: str
    """Fingerprint hex of ``sender_key`` (how the REPL names users)."""
    created_ms: int
    body: str


def seal(
    secret: bytes,
    public_key: bytes,
    sign: Callable[[bytes], bytes],
    body: str,
    *,
    now_ms: int,
    ttl_ms: int = DEFAULT_TTL_MS,
    hop_limit: int = DEFAULT_HOP_LIMIT,
    msg_id: bytes | None = None,
) -> ChannelMessage:
    """A message for the channel of ``secret``, signed by ``sign`` (the identity's)."""
    cid = channel_id(secret)
    mid = msg_id if msg_id is not None else os.urandom(MSG_ID_LEN)
    expiry = now_ms + ttl_ms
    sig = sign(signed_bytes(cid, mid, expiry, now_ms, body))
    plain = channel_pb2.ChannelPlaintext(
        sender_key=public_key, created_ms=now_ms, body=body, signature=sig
    ).SerializeToString(deterministic=True)
    nonce = os.urandom(NONCE_LEN)
    ct = ChaCha20Poly1305(channel_key(secret)).encrypt(nonce, pad(plain), _aad(cid, mid, expiry))
    return ChannelMessage(cid, mid, expiry, hop_limit, nonce + ct)


def open_message(secret: bytes, msg: ChannelMessage) -> Opened:
    """Decrypt and verify; ChannelTampered or ChannelForged when it must be dropped."""
    if msg.channel_id != channel_id(secret):
        raise ChannelTampered("not a message of this channel")
    nonce, ct = msg.sealed[:NONCE_LEN], msg.sealed[NONCE_LEN:]
    try:
        padded = ChaCha20Poly1305(channel_key(secret)).decrypt(
            nonce, ct, _aad(msg.channel_id, msg.msg_id, msg.expiry_ms)
        )
    except (InvalidTag, ValueError):
        raise ChannelTampered("wrong channel key or tampered message") from None
    try:
        pt = channel_pb2.ChannelPlaintext.FromString(unpad(padded))
    except (DecodeError, RemoteProtocolError):
        # Sealed under the channel key, so by a member: one who writes garbage.
        raise ChannelForged("sealed content is not a channel plaintext") from None
    signed = signed_bytes(msg.channel_id, msg.msg_id, msg.expiry_ms, pt.created_ms, pt.body)
    try:
        crypto.verify(bytes(pt.sender_key), signed, bytes(pt.signature))
        sender = crypto.fingerprint_of(bytes(pt.sender_key))
    except crypto.MlsError:
        raise ChannelForged("signature does not match the sender it names") from None
    return Opened(bytes(pt.sender_key), sender, pt.created_ms, pt.body)


class BroadcastReport(msgspec.Struct, frozen=True):
    channel: str
    msg_id: bytes
    duplicate: bool
    seq: int


def _in_creation_order(got: list[tuple[int, Incoming]]) -> list[Incoming]:
    """What one receive fetched, in the senders' creation order (``created_ms`` is
    inside the seal). The node's seq is arrival order there: after a heal, gossip and
    the inventory sync bring a partition's messages in any order, while a member must
    read each sender's lines in the order they were written. Stable: equal times keep
    the node's order."""
    return [m for _, m in sorted(got, key=lambda t: t[0])]


class Channels(AgentPart):
    """One identity's channels: joined ones in client.db, broadcast and receive."""

    def __init__(self, ctx: AgentContext) -> None:
        super().__init__(ctx)
        self.unsupported = False
        """The node has no Channel service (an older node): receive skips channels."""

    async def create(self, name: str) -> bytes:
        secret = new_secret()
        await self.join(name, secret)
        return secret

    async def join(self, name: str, secret: bytes) -> None:
        _check_len(secret)
        cid = channel_id(secret)
        await self._state.call(self._st.join_channel, name, cid, secret, self._wall_ms())

    async def leave(self, name: str) -> None:
        if not await self._state.call(self._st.leave_channel, name):
            raise AgentError(f"no channel named {name!r}")

    async def joined(self) -> list[tuple[str, bytes, bytes]]:
        """(name, channel id, secret) of every joined channel, by name."""
        return [(c.name, c.channel_id, c.secret) for c in await self._state.call(self._st.channels)]

    async def broadcast(self, name: str, text: str) -> BroadcastReport:
        if not text:
            raise AgentError("nothing to broadcast")
        if len(text) > MAX_BODY:
            raise AgentError(f"a broadcast holds at most {MAX_BODY} characters")
        ch = await self._state.call(self._st.channel, name)
        if ch is None:
            raise AgentError(f"no channel named {name!r} (/channel join NAME SECRET)")
        msg = seal(
            ch.secret, self._ident.public_key, self._ident.sign, text, now_ms=self._wall_ms()
        )
        resp = await self._rpc.call(
            "qpc.v1.Channel/Publish",
            channel_pb2.ChannelPublishRequest(message=msg.to_proto()),
            channel_pb2.ChannelPublishResponse,
        )
        if resp.status != rpc_pb2.STATUS_CODE_OK:
            raise AgentError(f"the node refused the broadcast: {resp.detail}")
        self._stats.sent += 1
        return BroadcastReport(name, msg.msg_id, resp.duplicate, resp.seq)

    async def receive(self, wait: float = 0.0) -> list[Incoming]:
        """Fetch new messages of joined channels from our node; long-poll up to ``wait``
        (the node also answers when mail for us arrives)."""
        if self.unsupported:
            return []
        chans = {c.channel_id: c for c in await self._state.call(self._st.channels)}
        if not chans:
            return []
        node = self._node()
        out: list[tuple[int, Incoming]] = []
        for page in range(FETCH_PAGES):
            cursors = await self._state.call(self._st.channel_cursors, node)
            req = channel_pb2.ChannelFetchRequest(
                cursors=[
                    channel_pb2.ChannelCursor(channel_id=cid, after_seq=cursors.get(cid, 0))
                    for cid in chans
                ],
                limit=128,
                wait_ms=int(wait * 1000) if page == 0 else 0,
            )
            try:
                resp = await self._rpc.call(
                    "qpc.v1.Channel/Fetch",
                    req,
                    channel_pb2.ChannelFetchResponse,
                    timeout=wait + 15.0,
                )
            except RpcError as exc:
                if exc.code == StatusCode.UNIMPLEMENTED:
                    self.unsupported = True
                    self._warn("this node does not serve broadcast channels", "no channels")
                    return _in_creation_order(out)
                raise
            for item in resp.messages:
                got = await self._one(chans, node, item)
                if got is not None:
                    out.append(got)
            if not resp.more:
                break
        self._stats.received += len(out)
        return _in_creation_order(out)

    async def _one(
        self, chans: dict[bytes, JoinedChannel], node: bytes, item: channel_pb2.StoredChannelMessage
    ) -> tuple[int, Incoming] | None:
        """The message opened and stored, with its sealed creation time."""
        cid = bytes(item.message.channel_id)
        ch = chans.get(cid)
        if ch is None:
            return None  # not a channel we asked for: nothing to advance
        now = self._wall_ms()
        try:
            # The node checked it; we check again (a node is not trusted more than a relay).
            msg = from_proto(item.message, now, ChannelPolicy(max_sealed=1 << 24))
        except ChannelMessageError as exc:
            self._stats.channel_tampered += 1
            self._drop(ch.name, f"malformed ({exc.reason})")
            await self._state.call(self._st.advance_channel_cursor, node, cid, item.seq)
            return None
        if await self._state.call(self._st.seen, msg.msg_id):
            self._stats.duplicates += 1
            await self._state.call(self._st.advance_channel_cursor, node, cid, item.seq)
            return None
        try:
            opened = open_message(ch.secret, msg)
        except ChannelForged:
            self._stats.channel_forged += 1
            self._drop(ch.name, "forged: its signature does not match its sender")
            await self._state.call(self._st.advance_channel_cursor, node, cid, item.seq)
            return None
        except ChannelTampered:
            self._stats.channel_tampered += 1
            self._drop(ch.name, "wrong key or tampered")
            await self._state.call(self._st.advance_channel_cursor, node, cid, item.seq)
            return None
        sender = bytes.fromhex(opened.sender)
        if sender == bytes.fromhex(self._ident.fingerprint):  # our own, echoed back
            await self._state.call(
                self._st.advance_channel_cursor, node, cid, item.seq, msg.msg_id, now
            )
            return None
        conv = "#" + ch.name
        await self._state.call(
            self._st.store_channel_received,
            item.seq,
            conv,
            sender,
            opened.body,
            now,
            node=node,
            channel_id=cid,
            msg_id=msg.msg_id,
        )
        return opened.created_ms, Incoming(item.seq, conv, opened.sender, opened.body)

    def _drop(self, name: str, why: str) -> None:
        log.info("dropped channel message", extra={"channel": name, "err": why})
        self._warn(f"a message in #{name} was dropped: {why}", "channel message dropped")

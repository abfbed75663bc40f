"""What the inventory sync reconciles: the node's stores as :class:`~.sync.SyncSource`.

- :class:`ChannelSource` (scope 1): the broadcast channel messages the node holds
  (:class:`~qpc_node.store.channels.ChannelStore`). Everything a peer hands over is
  checked as any neighbour input (``decode_channel_message`` under the node's
  :class:`~qpc_node.wire.channel.ChannelPolicy`: malformed, oversize, expired, expiry
  too far ahead, hop limit), refused ones are counted by the store's per-reason
  counters and nothing of them is stored. What is new here is handed to ``on_new``
  (the node wires the gossip driver's ``inject``: the message is pushed on the tree
  like a first reception from that peer, so the rest of the mesh gets it without a
  re-flood).

- :class:`HeldSource` (scope 2): held envelopes (kind 1) and receipt tombstones
  whose signed receipt is kept (kind 2), within expiry. ``offer`` gives a held
  envelope only to a peer that may carry it -- a carrier (its Ping flag) gets a copy
  with half the tokens once ``storefwd.spray_delay_s`` has passed, as a spray would
  (binary spray: a 1-token copy does not go), a peer the
  routing core names as the next hop toward the recipient gets one -- and never to
  the node it came from or one on its trail (it has a copy, or gave us ours); the
  copy is recorded as a spray (tokens kept, trail) when it is offered. A receipt goes
  to anyone who lacks it (it purges their copy). ``take`` hands envelopes to the same
  custody path as ``RelayEnqueue`` (expiry cap, hop limit, quotas, tombstones: a
  copy of a receipted msg_id is a duplicate) and receipts to the same verification
  as ``Federation/Receipt``; a verified receipt for a msg_id never seen here is kept
  as a tombstone.

  Items on the sync wire: one kind byte, then kind 1: a ``RelayEnqueueRequest``
  with one envelope (and its origin, origin node and spray tokens, as a spray
  sends); kind 2: the envelope's expiry (u64, big-endian: what the receipt's
  tombstone lives until) and a ``DeliveryReceipt``. Anything else is refused and
  counted (:attr:`HeldSource.refused`).

Order. Negentropy reports ids range by range in timestamp order, and a timestamp is
an item's expiry (sync.py): for one sender's messages with the same lifetime that is
their creation order. ``offer`` answers and ``take`` stores in (expiry, msg_id) order
so the sequence numbers a node gives what a heal brings follow it too (clients page
by them).
"""

from __future__ import annotations

import functools
import struct
from collections import Counter
from collections.abc import Callable, Sequence

import msgspec
from google.protobuf.message import DecodeError

from qpc_node.errors import QpcError, RemoteProtocolError
from qpc_node.federation.custody import Custody, status_name
from qpc_node.federation.routes import NextHop
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.channels import ChannelStore
from qpc_node.store.held import (
    HeldRow,
    held_for_sync,
    receipts_for_sync,
    spray_done,
    sync_inventory,
)
from qpc_node.storefwd import receipts as rc
from qpc_node.storefwd.held import (
    ExpiryVerdict,
    HoldPolicy,
    check_expiry,
    spray_due,
    spray_split,
)
from qpc_node.storefwd.sync import (
    KIND_CHANNEL,
    KIND_HELD,
    KIND_RECEIPT,
    SCOPE_CHANNELS,
    SCOPE_HELD,
    sync_id,
)
from qpc_node.wire.channel import ChannelMessage, ChannelMessageError, decode_channel_message
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2

__all__ = [
    "ChannelSource",
    "HeldItem",
    "HeldSource",
    "NewItem",
    "ReceiptItem",
    "SyncItemError",
    "parse_item",
]

NewItem = Callable[[bytes, bytes], object]
"""``(encoded item, peer)``: called for each item a source took as new."""


def _channel_id(msg_id: bytes) -> bytes:
    return sync_id(SCOPE_CHANNELS, KIND_CHANNEL, msg_id)


class ChannelSource:
    """Scope 1 over the node's channel store (see the module docstring)."""

    scope = SCOPE_CHANNELS

    def __init__(self, channels: ChannelStore, on_new: NewItem | None = None) -> None:
        self._channels = channels
        self.on_new: NewItem = on_new or (lambda _data, _peer: None)
        self.taken = 0
        """Items peers handed over that were new here."""
        self.refused = 0
        """Items refused by the relay checks (also counted per reason by the store)."""

    async def items(self, now_ms: int) -> list[tuple[int, bytes]]:
        held = await self._channels.holding(now_ms)
        return [(expiry, _channel_id(mid)) for expiry, mid in held]

    async def offer(self, peer: bytes, ids: Sequence[bytes], now_ms: int) -> list[bytes]:
        """Every channel message among ``ids`` that we still serve (anyone may carry
        them: relays cannot read them), by (expiry, msg_id)."""
        del peer
        want = set(ids)
        found = sorted(
            (expiry, mid)
            for expiry, mid in await self._channels.holding(now_ms)
            if _channel_id(mid) in want
        )
        return await self._channels.get([mid for _, mid in found], now_ms)

    async def take(self, peer: bytes, items: Sequence[bytes], now_ms: int) -> int:
        ok: list[ChannelMessage] = []
        for data in items:
            try:
                ok.append(decode_channel_message(data, now_ms, self._channels.policy))
            except ChannelMessageError as exc:
                self._channels.refused(exc)
                self.refused += 1
        ok.sort(key=lambda m: (m.expiry_ms, m.msg_id))
        if not ok:
            return 0
        added = await self._channels.store_checked(ok, now_ms)
        new = 0
        for m, a in zip(ok, added, strict=True):
            if a.new:
                new += 1
                self.on_new(m.encode(), peer)
        self.taken += new
        return new


_TAKEN = frozenset(
    {federation_pb2.RELAY_HELD, federation_pb2.RELAY_QUEUED, federation_pb2.RELAY_STORED_LOCAL}
)
_EXPIRY = struct.Struct(">Q")
MAX_ITEM_BYTES = 256 * 1024
"""A scope-2 item above this is refused before parsing (an envelope is far smaller)."""


def encode_held(h: HeldRow, tokens: int) -> bytes:
    """A held envelope as a scope-2 item: the copy a spray would send (one hop less)."""
    e = h.envelope
    req = federation_pb2.RelayEnqueueRequest(
        envelopes=[
            envelope_pb2.Envelope(
                msg_id=e.msg_id,
                recipient=e.recipient,
                expiry_ms=e.expiry_ms,
                hop_limit=e.hop_limit - 1,
                ciphertext=e.ciphertext,
            )
        ],
        origins=[h.origin or b""],
        origin_nodes=[h.origin_node],
        spray_tokens=[tokens],
    )
    return bytes((KIND_HELD,)) + req.SerializeToString(deterministic=True)


def encode_receipt(expiry_ms: int, receipt: bytes) -> bytes:
    return bytes((KIND_RECEIPT,)) + _EXPIRY.pack(expiry_ms) + receipt


class SyncItemError(RemoteProtocolError):
    """A scope-2 item a node refuses before any store sees it; ``reason`` is counted."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class HeldItem(msgspec.Struct, frozen=True):
    request: federation_pb2.RelayEnqueueRequest
    """One envelope with its origin, origin node and spray tokens (0 or 1 each)."""


class ReceiptItem(msgspec.Struct, frozen=True):
    expiry_ms: int
    receipt: rc.Receipt | QpcError
    """Parsed (lengths checked) or the typed error: verification is the receipt path's."""


def parse_item(data: bytes, now_ms: int, policy: HoldPolicy) -> HeldItem | ReceiptItem:
    """Parse one scope-2 item from a peer (the wire layout is in the module docstring).

    The envelope itself is checked by the custody path it is handed to; here only
    the framing, and a receipt's declared expiry against the node's cap. Every
    defect is a :class:`SyncItemError`."""
    if len(data) < 2 or len(data) > MAX_ITEM_BYTES:
        raise SyncItemError("malformed", f"item of {len(data)} bytes")
    kind, body = data[0], data[1:]
    try:
        if kind == KIND_HELD:
            req = federation_pb2.RelayEnqueueRequest.FromString(body)
            if len(req.envelopes) != 1 or any(
                len(x) > 1 for x in (req.origins, req.origin_nodes, req.spray_tokens)
            ):
                raise SyncItemError("malformed", "one envelope per item")
            return HeldItem(req)
        if kind == KIND_RECEIPT and len(body) > _EXPIRY.size:
            (exp,) = _EXPIRY.unpack_from(body)
            pb = federation_pb2.DeliveryReceipt.FromString(body[_EXPIRY.size :])
        else:
            raise SyncItemError("malformed", f"unknown item kind {kind}")
    except DecodeError as exc:
        raise SyncItemError("malformed", f"malformed item: {exc}") from None
    verdict = check_expiry(exp, now_ms, policy)
    if verdict is not ExpiryVerdict.OK:
        raise SyncItemError(f"receipt_{verdict.value}", f"receipt expiry: {verdict.value}")
    (parsed,) = rc.parse_receipts([pb])
    return ReceiptItem(exp, parsed)


class HeldSource:
    """Scope 2 over the store-and-forward tables (see the module docstring)."""

    scope = SCOPE_HELD

    def __init__(self, store: AsyncStore, custody: Custody) -> None:
        self._store = store
        self._custody = custody
        self._sf = custody.storefwd
        self.refused: Counter[str] = Counter()
        """Items refused, by reason (malformed, an envelope's relay status, a receipt's
        verdict is counted by the store-and-forward statistics)."""
        self.taken = 0

    async def items(self, now_ms: int) -> list[tuple[int, bytes]]:
        inv = await self._store.run(lambda s: sync_inventory(s, now_ms))
        return [(e, sync_id(SCOPE_HELD, KIND_HELD, m)) for e, m in inv.held] + [
            (e, sync_id(SCOPE_HELD, KIND_RECEIPT, m)) for e, m in inv.receipts
        ]

    async def offer(self, peer: bytes, ids: Sequence[bytes], now_ms: int) -> list[bytes]:
        inv = await self._store.run(lambda s: sync_inventory(s, now_ms))
        want = set(ids)
        held_ids = [m for _, m in inv.held if sync_id(SCOPE_HELD, KIND_HELD, m) in want]
        rec_ids = [m for _, m in inv.receipts if sync_id(SCOPE_HELD, KIND_RECEIPT, m) in want]
        out: list[tuple[int, bytes]] = []
        if held_ids:
            rows = await self._store.run(
                functools.partial(held_for_sync, msg_ids=held_ids, peer=peer, now_ms=now_ms)
            )
            carrier = self._sf.carrier(peer)
            given: list[tuple[HeldRow, int]] = []
            for h in rows:
                if carrier:
                    split = spray_split(h.tokens)
                    if split is None or not spray_due(h.held_ms, now_ms, self._sf.policy):
                        continue  # one token: it moves only on a route; or not yet
                    kept, give = split
                else:
                    route = self._sf.route(h.envelope.recipient)
                    if not (isinstance(route, NextHop) and route.node_id == peer):
                        continue  # neither a carrier nor on the way to the home
                    kept, give = h.tokens, 1
                given.append((h, kept))
                out.append((h.envelope.expiry_ms, encode_held(h, give)))
            if given:
                # Recorded now (the answer to a fetch does not say what was taken):
                # tokens halve and receipts will go to the peer too. A copy to a
                # carrier is a spray, counted as one.
                await self._store.run(lambda s: spray_done(s, peer, given))
                if carrier:
                    self._sf.c_sprayed += len(given)
        if rec_ids:
            got = await self._store.run(
                functools.partial(receipts_for_sync, msg_ids=rec_ids, now_ms=now_ms)
            )
            out += [(e, encode_receipt(e, r)) for e, r in got]
        out.sort(key=lambda t: t[0])
        return [item for _, item in out]

    async def take(self, peer: bytes, items: Sequence[bytes], now_ms: int) -> int:
        envs: list[tuple[int, federation_pb2.RelayEnqueueRequest]] = []
        receipts: list[tuple[int, rc.Receipt | QpcError]] = []
        policy = self._sf.policy
        for data in items:
            try:
                got = parse_item(data, now_ms, policy)
            except SyncItemError as exc:
                self.refused[exc.reason] += 1
                continue
            if isinstance(got, HeldItem):
                envs.append((got.request.envelopes[0].expiry_ms, got.request))
            else:
                receipts.append((got.expiry_ms, got.receipt))
        taken = 0
        if receipts:  # first: a receipt refuses the copy it purges
            taken += await self._sf.on_receipts(
                peer, [r for _, r in receipts], expiries=[e for e, _ in receipts]
            )
        if envs:
            envs.sort(key=lambda t: t[0])
            reqs = [r for _, r in envs]
            results = await self._custody.take_custody(
                [r.envelopes[0] for r in reqs],
                from_node=peer,
                origins=[r.origins[0] if r.origins else b"" for r in reqs],
                origin_nodes=[r.origin_nodes[0] if r.origin_nodes else b"" for r in reqs],
                spray_tokens=[r.spray_tokens[0] if r.spray_tokens else 0 for r in reqs],
            )
            for res in results:
                if res.status in _TAKEN:
                    taken += 1
                else:
                    self.refused[status_name(res.status).lower()] += 1
        self.taken += taken
        return taken

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

Order. Negentropy reports ids range by range in timestamp order, and a timestamp is
an item's expiry (sync.py): for one sender's messages with the same lifetime that is
their creation order. ``offer`` answers and ``take`` stores in (expiry, msg_id) order
so the sequence numbers a node gives what a heal brings follow it too (clients page
by them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qpc_node.store.channels import ChannelStore
from qpc_node.storefwd.sync import KIND_CHANNEL, SCOPE_CHANNELS, sync_id
from qpc_node.wire.channel import ChannelMessage, ChannelMessageError, decode_channel_message

__all__ = ["ChannelSource", "NewItem"]

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

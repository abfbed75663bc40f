"""An in-memory transport with QUIC stream semantics, for tests of RPC users.

Services can run their handlers against a real RpcServer and RpcClient
without sockets or certificates: ``MemoryConnection(server, nursery)`` gives
an ``open_stream`` for RpcClient and serves every stream it opens. Streams
support ``reset(code)`` like qpc_node.quic streams, so cancellation paths are
the same as over QUIC.
"""

from __future__ import annotations

import itertools

import trio
import trio.testing

from qpc_node.errors import RemoteProtocolError, StatusCode
from qpc_node.rpc.context import PeerInfo
from qpc_node.rpc.server import RpcServer, ServerConnection

_ids = itertools.count(1)


class MemoryStreamReset(RemoteProtocolError):
    """The peer reset the stream (mirrors qpc_node.quic StreamReset)."""

    code = StatusCode.CANCELLED

    def __init__(self, error_code: int) -> None:
        super().__init__(f"stream reset by peer (error code {error_code})")
        self.error_code = error_code


class MemoryStream(trio.abc.HalfCloseableStream):
    """One end of a bidirectional in-memory stream."""

    def __init__(
        self, send: trio.testing.MemorySendStream, receive: trio.testing.MemoryReceiveStream
    ) -> None:
        self._send = send
        self._receive = receive
        self._peer: MemoryStream | None = None
        self._peer_reset: int | None = None
        self.stream_id = next(_ids)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._send.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._send.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._peer_reset is not None:
            raise MemoryStreamReset(self._peer_reset)
        data = await self._receive.receive_some(max_bytes)
        if not data and self._peer_reset is not None:
            raise MemoryStreamReset(self._peer_reset)
        return bytes(data)

    def reset(self, error_code: int) -> None:
        """Abandon both directions: the peer's reads raise MemoryStreamReset."""
        if self._peer is not None and self._peer._peer_reset is None:
            self._peer._peer_reset = error_code
        self._send.close()
        self._receive.close()

    async def aclose(self) -> None:
        self._send.close()
        self._receive.close()
        await trio.lowlevel.checkpoint()


def memory_stream_pair() -> tuple[MemoryStream, MemoryStream]:
    """(client end, server end) of one stream."""
    a_send, b_receive = trio.testing.memory_stream_one_way_pair()
    b_send, a_receive = trio.testing.memory_stream_one_way_pair()
    a = MemoryStream(a_send, a_receive)
    b = MemoryStream(b_send, b_receive)
    a._peer, b._peer = b, a
    return a, b


class MemoryConnection:
    """A fake connection: each ``open_stream`` is served by ``server`` in ``nursery``."""

    def __init__(
        self, server: RpcServer, nursery: trio.Nursery, peer: PeerInfo | None = None
    ) -> None:
        self.server = server
        self._nursery = nursery
        self.peer = peer or PeerInfo(connection_id=f"mem-{next(_ids)}")
        self.state: ServerConnection = server.open_connection(self.peer)
        self.streams_opened = 0

    async def open_stream(self) -> MemoryStream:
        client_end, server_end = memory_stream_pair()
        self.streams_opened += 1
        self._nursery.start_soon(self.server.handle_stream, self.state, server_end)
        await trio.lowlevel.checkpoint()
        return client_end

    async def open_raw_stream(self) -> MemoryStream:
        """Like open_stream; for tests that write bytes the client never would."""
        return await self.open_stream()

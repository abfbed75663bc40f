"""RPC over qpc_node.quic: the stream handler that feeds an RpcServer.

Kept apart from the server so the RPC core depends only on
``trio.abc.HalfCloseableStream`` (and is tested over memory streams); this
module is the one place that knows QUIC connections carry identities.
"""

from __future__ import annotations

import itertools
import weakref

from qpc_node.quic import Connection, QuicStream
from qpc_node.rpc.context import PeerInfo
from qpc_node.rpc.server import RpcServer, ServerConnection


class QuicRpcHandler:
    """``await nursery.start(endpoint.serve, QuicRpcHandler(server))``.

    Per-connection state (session, call limit) lives as long as the QUIC
    connection object: a weak map, so a closed connection's session goes with it.
    """

    def __init__(self, server: RpcServer) -> None:
        self.server = server
        self._states: weakref.WeakKeyDictionary[Connection, ServerConnection] = (
            weakref.WeakKeyDictionary()
        )
        self._ids = itertools.count(1)

    def state(self, conn: Connection) -> ServerConnection:
        state = self._states.get(conn)
        if state is None:
            peer = PeerInfo(
                connection_id=f"q{next(self._ids)}",
                remote_address=tuple(conn.remote_address),
                identity=conn.peer_identity,
                alpn=conn.alpn,
            )
            state = self.server.open_connection(peer)
            self._states[conn] = state
        return state

    async def __call__(self, conn: Connection, stream: QuicStream) -> None:
        await self.server.handle_stream(self.state(conn), stream)

"""A node whose connection tasks are cancelled (it is stopping) still closes them.

Found by the reconnect tests: a stopped node cancels its connection tasks
before its drain gets to close them, so clients heard nothing and only
reconnected after their dead-peer timeout (30 s).
"""

from __future__ import annotations

import trio

from qpc_node.quic import ALPN_CLIENT, ClientTLS, Connection, QuicStream, ServerTLS, open_endpoint
from qpc_node.quic.testing import make_test_pki, serving


async def test_node_cancelling_its_connections_tells_the_client() -> None:
    """A node that stops cancels its connection tasks before its drain gets to
    close them; a connection ending that way must still send CONNECTION_CLOSE,
    or every client waits out its dead-peer timeout (30 s) to reconnect."""
    pki = make_test_pki()

    async def echo(_conn: Connection, stream: QuicStream) -> None:
        await stream.send_all(await stream.receive_some())

    async with (
        open_endpoint("127.0.0.1", 0, server_tls=ServerTLS(pki.server)) as server,
        serving(server, echo),
        open_endpoint("127.0.0.1", 0) as client,
    ):
        conn = await client.connect(
            *server.local_address, ClientTLS(ALPN_CLIENT, pin=pki.server.fingerprint)
        )
        stream = await conn.open_stream()
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"
        (served,) = server.connections()
        server._nursery.cancel_scope.cancel()  # what a cancelled node does to them first
        with trio.fail_after(10):
            await served.closed.wait()
            await conn.closed.wait()  # in well under the client's 22.5 s idle timeout
        assert conn.close_error is not None and conn.close_error.reason == "connection ended"

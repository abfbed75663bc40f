"""Health call from the host's Python (the .venv's qpc_node) into a packaged node.

``python health_probe.py HOST PORT PIN`` prints the status name; used in-process by the
tests and as a command inside a network namespace (``ip netns exec NS python ...``).
"""

from __future__ import annotations

import sys

import trio


async def _probe(host: str, port: int, pin: str) -> str:
    # Imported here: the packaging tests only need qpc_node when a node is being probed.
    import qpc_node.client.connect as c
    from qpc_node.rpc.client import RpcClient
    from qpc_node.rpc.health import HEALTH_METHOD
    from qpc_node.wire.gen.qpc.v1 import health_pb2

    async with c.open_endpoint("::", 0) as ep:
        conn = await ep.connect(host, port, c.ClientTLS(c.ALPN_CLIENT, pin=pin))
        try:
            resp = await RpcClient(conn.open_stream).call(
                HEALTH_METHOD, health_pb2.HealthRequest(), health_pb2.HealthResponse
            )
        finally:
            await conn.aclose()
    return health_pb2.HealthResponse.ServingStatus.Name(resp.status)


def probe(host: str, port: int, pin: str, seconds: float = 20.0) -> str:
    async def bounded() -> str:
        with trio.fail_after(seconds):
            return await _probe(host, port, pin)

    return trio.run(bounded)


if __name__ == "__main__":
    print(probe(sys.argv[1], int(sys.argv[2]), sys.argv[3]))

"""Open a user agent on a node: QUIC with a pinned certificate, auth, KeyPackages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from qpc_node.client.agent import Agent
from qpc_node.client.identity_store import open_user
from qpc_node.client.state import AsyncClientState, ClientState
from qpc_node.errors import ConfigError
from qpc_node.ops.clock import WallClock, system_wall_ms
from qpc_node.quic import ALPN_CLIENT, ClientTLS, open_endpoint
from qpc_node.quic.tls import normalize_fingerprint
from qpc_node.rpc import RpcClient

PIN_FILE = "node.pin"


def remembered_pin(data_dir: Path) -> str | None:
    try:
        return (data_dir / PIN_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


@asynccontextmanager
async def open_agent(
    data_dir: Path,
    host: str,
    port: int,
    *,
    pin: str | None,
    passphrase: str | None = None,
    wall_ms: WallClock = system_wall_ms,
) -> AsyncIterator[Agent]:
    pin = pin or remembered_pin(data_dir)
    if pin is None:
        raise ConfigError(
            "no node certificate pin: pass --pin FINGERPRINT (qpc node prints it at start)"
        )
    pin = normalize_fingerprint(pin)
    user = await trio.to_thread.run_sync(open_user, data_dir, passphrase)
    state = ClientState(data_dir, user.secret)
    try:
        async with open_endpoint("::", 0) as ep:
            conn = await ep.connect(host, port, ClientTLS(ALPN_CLIENT, pin=pin))
            (data_dir / PIN_FILE).write_text(pin + "\n")
            agent = Agent(
                user.ident,
                AsyncClientState(state),
                RpcClient(conn.open_stream),
                node_cert_fingerprint=bytes.fromhex(pin),
                wall_ms=wall_ms,
            )
            await agent.authenticate()
            await agent.top_up_key_packages()
            await agent.flush_outbox()
            try:
                yield agent
            finally:
                await conn.aclose()
    finally:
        state.close()

"""Open a user agent on a node: QUIC with a pinned certificate, auth, KeyPackages, reconnect."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from qpc_node.client.agent import Agent
from qpc_node.client.identity_store import open_user
from qpc_node.client.reconnect import ReconnectPolicy, failover_order
from qpc_node.client.session import Session, Target, parse_address
from qpc_node.client.state import SEEN_KEEP_MS, AsyncClientState, ClientState, KnownNode
from qpc_node.errors import ConfigError, LocalProtocolError, QpcError
from qpc_node.groups.core import GroupConfig
from qpc_node.ops.clock import WallClock, system_wall_ms
from qpc_node.ops.log import get_logger
from qpc_node.quic import ALPN_CLIENT, ClientTLS, QuicSettings, open_endpoint
from qpc_node.quic.tls import normalize_fingerprint

PIN_FILE = "node.pin"
ADDRESSES_TRIED = 2
"""Addresses of one failover candidate dialled at most (best first: see dial_order)."""
NODES_REFRESH = 30.0
"""Seconds between asking our node for its peers (what failover picks from)."""

log = get_logger("qpc.client")


def _targets(known: list[KnownNode], here: bytes | None) -> list[Target]:
    """Failover targets: the nodes we know but ``here``, best first, pinned by node id."""
    out: list[Target] = []
    for n in failover_order(known, here):
        for a in n.addresses[:ADDRESSES_TRIED]:
            try:
                h, p = parse_address(a)
            except LocalProtocolError:
                continue
            out.append(Target(h, p, ClientTLS(ALPN_CLIENT, node_id=n.node_id), n.node_id))
    return out


async def _learn_nodes(agent: Agent, session: Session) -> None:
    """Remember our node's peers (and our node) in client.db; a node that is not on a
    mesh, or a failed call, leaves what we knew."""
    try:
        await agent.refresh_nodes(session.server)
    except QpcError as exc:
        log.info("could not read the mesh peers", extra={"why": str(exc)})


async def _keep_learning_nodes(agent: Agent, session: Session) -> None:
    while True:
        await trio.sleep(NODES_REFRESH)
        if session.connected:
            await _learn_nodes(agent, session)


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
    group_config: GroupConfig | None = None,
) -> AsyncIterator[Agent]:
    async with open_session(
        data_dir,
        host,
        port,
        pin=pin,
        passphrase=passphrase,
        wall_ms=wall_ms,
        group_config=group_config,
    ) as (agent, _session):
        yield agent


@asynccontextmanager
async def open_session(
    data_dir: Path,
    host: str,
    port: int,
    *,
    pin: str | None,
    passphrase: str | None = None,
    wall_ms: WallClock = system_wall_ms,
    settings: QuicSettings | None = None,
    policy: ReconnectPolicy | None = None,
    group_config: GroupConfig | None = None,
) -> AsyncIterator[tuple[Agent, Session]]:
    """An agent whose session reconnects (and re-authenticates) when the connection dies.

    The first connection must succeed (errors go to the caller); later losses
    are the session's to repair while the block runs.
    """
    pin = pin or remembered_pin(data_dir)
    if pin is None:
        raise ConfigError(
            "no node certificate pin: pass --pin FINGERPRINT (qpc node prints it at start)"
        )
    pin = normalize_fingerprint(pin)
    user = await trio.to_thread.run_sync(open_user, data_dir, passphrase)
    state = ClientState(data_dir, user.secret)
    astate = AsyncClientState(state)
    try:
        async with open_endpoint("::", 0, settings=settings) as ep:
            session = Session(ep, host, port, ClientTLS(ALPN_CLIENT, pin=pin), policy=policy)
            # Our node may be the one that died: the nodes we knew are the way back.
            known = await astate.call(state.nodes)
            session.started_elsewhere = await session.connect_first(_targets(known, None))
            if session.started_elsewhere is None:
                (data_dir / PIN_FILE).write_text(pin + "\n")
            agent = Agent(
                user.ident,
                astate,
                session.rpc,
                node_cert_fingerprint=bytes.fromhex(pin),
                wall_ms=wall_ms,
                group_config=group_config,
            )
            await astate.call(state.forget_seen_before, wall_ms() - SEEN_KEEP_MS)
            await agent.authenticate(server=session.server)
            await agent.top_up_key_packages()
            await agent.flush_outbox()
            await _learn_nodes(agent, session)

            async def candidates() -> list[Target]:
                """The nodes we know, best first, each pinned by its node id."""
                here = session.server.node_id if session.server is not None else None
                return _targets(await agent.known_nodes(), here)

            session.candidates = candidates

            async def on_dial(target: Target, ok: bool) -> None:
                if target.node_id is not None:
                    await agent.node_result(target.node_id, ok=ok)

            session.on_dial = on_dial

            async def after_up() -> None:
                # What waited out the outage is sent now, not at its backoff time (on
                # another node after a move: the KeyPackages of our new home, too).
                await astate.call(state.outbox_due_now, wall_ms())
                await agent.flush_outbox()
                await agent.top_up_key_packages()
                await _learn_nodes(agent, session)

            body_error: BaseException | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run, agent.authenticate, after_up)
                nursery.start_soon(_keep_learning_nodes, agent, session)
                try:
                    yield agent, session
                # Re-raised outside the nursery: the caller gets its own exception,
                # not an ExceptionGroup around it.
                except BaseException as exc:
                    body_error = exc
                finally:
                    nursery.cancel_scope.cancel()
            if body_error is not None:
                raise body_error
    finally:
        state.close()

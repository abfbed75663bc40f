"""A user's way to its node that outlives one QUIC connection.

The agent's :class:`~qpc_node.rpc.RpcClient` opens its streams through
:meth:`Session.open_stream`, never on a connection directly, so when the
connection dies (node restarted, idle timeout, network blip) the session
swaps in a new one and the agent carries on: nothing in the agent is bound to
a connection. The node keeps authentication per connection, so a new one is
only handed out after Auth/Challenge + Auth/Prove succeeded on it (with a
separate RpcClient on the raw connection); until then calls fail at once with
:class:`NotConnected` (UNAVAILABLE, retriable: the outbox keeps what it holds).
The new connection is dialled with the same :class:`ClientTLS`, so a node whose
certificate no longer matches the pin is refused, and that refusal is final.

The schedule (backoff, jitter, what to tell the user) is the sans-IO
:class:`~qpc_node.client.reconnect.Reconnector`; this module only waits, dials
and reports. Receiving resumes by itself: the agent fetches after the cursor
stored in ``client.db``, which the connection never held.
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Awaitable, Callable, Sequence

import msgspec
import trio

from qpc_node.client.reconnect import Notice, Phase, Reconnector, ReconnectPolicy
from qpc_node.errors import LocalProtocolError, QpcError, RemoteProtocolError, StatusCode
from qpc_node.mesh.nodeid import NotANodeKey, node_id_of_certificate
from qpc_node.ops.log import get_logger
from qpc_node.quic import ClientTLS, Connection, Endpoint, HandshakeError, QuicStream
from qpc_node.quic.tls import fingerprint
from qpc_node.rpc import RpcClient

log = get_logger("qpc.client.session")

# QUIC CRYPTO_ERROR range (RFC 9001 4.8): a TLS alert. Against a node we reached
# before, that is its certificate failing our pin (or another TLS refusal); a
# retry cannot fix it and must not look like "the node is still down".
_CRYPTO_ERRORS = range(0x100, 0x200)


class ServerId(msgspec.Struct, frozen=True):
    """Who a connection reached: what the agent binds its proof to and keys its cursor by."""

    cert_fingerprint: bytes
    node_id: bytes | None
    """Its mesh id (SHA-256 of its Ed25519 key); None for a node with another key type."""
    address: str

    @property
    def key(self) -> bytes:
        return self.node_id if self.node_id is not None else self.cert_fingerprint

    @property
    def short(self) -> str:
        return self.key[:4].hex()

    @classmethod
    def of(cls, conn: Connection, address: str) -> ServerId:
        chain = conn.peer_certificate_chain
        if not chain:
            raise RemoteProtocolError("the node presented no certificate")
        try:
            nid: bytes | None = node_id_of_certificate(chain[0])
        except NotANodeKey:
            nid = None
        return cls(bytes.fromhex(fingerprint(chain[0])), nid, address)


class Target(msgspec.Struct, frozen=True):
    """A node to dial: where, and how its certificate is checked."""

    host: str
    port: int
    tls: ClientTLS
    node_id: bytes | None = None

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6%scope]:port`` (what /mesh peers shows) -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LocalProtocolError(f"not a node address (HOST:PORT): {text!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise LocalProtocolError(f"not a node address (HOST:PORT): {text!r}")
        host = host[1:-1]
    return host, int(port)


def dial_order(addresses: Sequence[str]) -> list[str]:
    """Addresses of one node in the order a client tries them: link-local ones last
    (their scope is the interface index on the host that reported them, which means
    another interface, or none, on ours), otherwise as given; unparseable ones dropped."""

    def link_local(text: str) -> bool:
        host = parse_address(text)[0].partition("%")[0]
        try:
            return ipaddress.ip_address(host).is_link_local
        except ValueError:
            return False

    ok = []
    for a in dict.fromkeys(addresses):
        try:
            ok.append((link_local(a), a))
        except LocalProtocolError:
            continue
    return [a for _, a in sorted(ok, key=lambda x: x[0])]


Authenticate = Callable[[RpcClient, ServerId], Awaitable[None]]
AfterUp = Callable[[], Awaitable[None]]
Candidates = Callable[[], Awaitable[list[Target]]]
"""Failover: the other nodes to try, best first (the session adds its own last)."""


class NotConnected(QpcError):
    """No authenticated connection to the node right now (the session is reconnecting)."""

    code = StatusCode.UNAVAILABLE


def is_refusal(exc: HandshakeError) -> bool:
    """A handshake the TLS layer refused (pin mismatch, bad certificate): permanent."""
    return exc.error_code in _CRYPTO_ERRORS


class Session:
    """One live, authenticated connection at a time; :meth:`run` replaces a dead one.

    ``authenticate`` proves our identity over a given RpcClient (the agent's
    Auth/Challenge + Prove); ``after_up`` runs once a new connection is in use
    (flush the outbox, top up KeyPackages). ``on_notice`` is told once that the
    connection was lost and once that it is back.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        host: str,
        port: int,
        tls: ClientTLS,
        *,
        policy: ReconnectPolicy | None = None,
        rand: Callable[[], float] = random.random,
        candidates: Candidates | None = None,
    ) -> None:
        self._ep = endpoint
        self._target = Target(host, port, tls)
        self._core = Reconnector(policy or ReconnectPolicy(), rand)
        self._conn: Connection | None = None
        self._changed = trio.Event()
        self.rpc = RpcClient(self.open_stream)
        self.on_notice: Callable[[Notice], None] = lambda _n: None
        self.candidates = candidates
        self.server: ServerId | None = None
        """Who the current connection reached (set once connected)."""
        self.generation = 0
        """Bumped whenever another connection is put in place (a call that failed on
        an older one failed because of the swap, not because of the node now in use)."""
        self.on_dial: Callable[[Target, bool], Awaitable[None]] | None = None
        """Told of each failover dial's outcome (the order of later candidates)."""
        self.started_elsewhere: Notice | None = None
        """Set when the first connection went to another node (ours was unreachable)."""
        self._authenticate: Authenticate | None = None
        self._after_up: AfterUp | None = None
        self._move_lock = trio.Lock()

    @property
    def phase(self) -> Phase:
        return self._core.phase

    @property
    def outages(self) -> int:
        """Connections lost since the start (for /stats)."""
        return self._core.outages

    @property
    def connected(self) -> bool:
        """Up, and the connection has not died under us (the supervisor may not know yet)."""
        conn = self._conn
        return self._core.phase is Phase.UP and conn is not None and conn.close_error is None

    def status(self) -> str:
        """Why calls fail now (for the user), or "connected"."""
        conn = self._conn
        if self._core.phase is Phase.UP and conn is not None and conn.close_error is not None:
            return f"connection lost ({conn.close_error}); reconnecting"
        return self._core.describe(trio.current_time())

    @property
    def target(self) -> Target:
        return self._target

    async def connect(self) -> Connection:
        """The first connection: errors go to the caller (nothing to resume yet)."""
        conn = await self._ep.connect(self._target.host, self._target.port, self._target.tls)
        self.server = ServerId.of(conn, self._target.address)
        self._conn = conn
        return conn

    async def connect_first(self, others: Sequence[Target]) -> Notice | None:
        """The first connection, when we know other nodes: our node first, then the
        others (each dial bounded), so a REPL started while its node is dead comes up
        elsewhere. A refusal by our node (its key changed) is not an outage: raised.
        Returns the notice to show when we came up on another node."""
        first = self._target
        others = [t for t in others if t.address != first.address]
        if not others:
            await self.connect()
            return None
        why: BaseException | None = None
        for target in [first, *others]:
            self._target = target
            try:
                with trio.fail_after(self._core.policy.failover_dial_timeout):
                    await self.connect()
            except HandshakeError as exc:
                if target is first and is_refusal(exc):
                    self._target = first
                    raise
                why = exc
                continue
            except (QpcError, OSError, trio.TooSlowError) as exc:
                why = exc
                continue
            if target is first:
                return None
            assert self.server is not None
            return Notice(
                "moved",
                f"node at {first.address} unreachable ({why or 'timed out'}); "
                f"now on node {self.server.short} at {target.address}",
            )
        self._target = first
        assert why is not None
        raise why

    async def probe(self, target: Target, timeout: float) -> float | None:  # noqa: ASYNC109 -- a bound on one dial
        """Seconds a QUIC handshake with ``target`` takes (its RTT as the client sees it,
        key check included); None when it fails or takes longer than ``timeout``."""
        start = trio.current_time()
        with trio.move_on_after(timeout):
            try:
                conn = await self._ep.connect(target.host, target.port, target.tls)
            except (QpcError, OSError) as exc:
                log.info("probe failed", extra={"node": target.address, "why": str(exc)})
                return None
            took = trio.current_time() - start
            await conn.aclose()
            return took
        return None

    async def move_to(self, target: Target) -> ServerId:
        """Log in on another node and use it from now on (``/mesh server``, ``/mesh auto``).

        The old connection is closed only once the new one is authenticated: a
        failed move leaves the session where it was (the error goes to the caller).
        """
        if self._authenticate is None:
            raise LocalProtocolError("Session.move_to before Session.run")
        async with self._move_lock:
            try:
                with trio.fail_after(self._core.policy.attempt_timeout):
                    conn = await self._ep.connect(target.host, target.port, target.tls)
            except (trio.TooSlowError, OSError) as exc:
                raise NotConnected(
                    f"{target.address} did not answer ({exc or 'timed out'})"
                ) from None
            try:
                with trio.fail_after(self._core.policy.attempt_timeout):
                    server = ServerId.of(conn, target.address)
                    await self._authenticate(
                        RpcClient(
                            conn.open_stream, default_timeout=self._core.policy.attempt_timeout
                        ),
                        server,
                    )
                if self._core.phase is not Phase.UP:  # lost ours meanwhile: the session's
                    raise NotConnected("the connection was lost during the move; retry")
            except BaseException as exc:
                await conn.aclose()
                if isinstance(exc, trio.TooSlowError):
                    raise NotConnected(f"{target.address}: login timed out") from None
                raise
            old = self._conn
            self._put(conn, target, server)
            if old is not None:
                await old.aclose()
        if self._after_up is not None:
            try:
                await self._after_up()
            except QpcError as exc:
                log.info("after move: %s", exc)
        return server

    def _put(self, conn: Connection, target: Target, server: ServerId) -> None:
        self._conn = conn
        self._target = target
        self.server = server
        self.generation += 1

    async def open_stream(self) -> QuicStream:
        """A stream on the current connection; NotConnected while there is none."""
        conn = self._conn
        if conn is None or not self.connected:
            raise NotConnected(f"not connected to the node: {self.status()}")
        return await conn.open_stream()

    async def wait_up(self, timeout: float = math.inf) -> None:  # noqa: ASYNC109 -- a bound on waiting
        """Until connected (at most ``timeout`` s); NotConnected when that does not happen."""
        with trio.move_on_after(timeout):
            while True:
                if self.connected:
                    return
                if self._core.phase is Phase.REFUSED:
                    break
                await self._changed.wait()
        raise NotConnected(f"not connected to the node: {self.status()}")

    def _set_phase_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _notify(self, notice: Notice | None) -> None:
        if notice is not None:
            log.info("session %s", notice.kind, extra={"why": notice.text})
            self.on_notice(notice)

    async def run(self, authenticate: Authenticate, after_up: AfterUp) -> None:
        """Supervise the connection until cancelled (call after :meth:`connect`)."""
        self._authenticate = authenticate
        self._after_up = after_up
        while True:
            conn = self._conn
            if conn is None:
                raise NotConnected("Session.run before the first connect()")
            await conn.closed.wait()
            if self._conn is not conn:  # replaced by a move: not an outage
                continue
            why = conn.close_error
            self._notify(self._core.lost(trio.current_time(), str(why or "closed")))
            self._set_phase_changed()
            await conn.aclose()
            if not await self._reconnect(authenticate):
                await trio.sleep_forever()  # refused for good: calls fail with why
            try:
                await after_up()
            except QpcError as exc:  # the next receive/flush retries; the link is up
                log.info("after reconnect: %s", exc)

    async def _reconnect(self, authenticate: Authenticate) -> bool:
        """Attempt until one succeeds (True) or is refused for good (False).

        Once the node has been unreachable for ``policy.failover_after`` seconds, an
        attempt tries the other nodes we know first (``candidates``, best first, each
        dial bounded by ``failover_dial_timeout``), then the lost node.
        """
        core = self._core
        while core.phase is Phase.WAITING:
            assert core.next_attempt_at is not None
            await trio.sleep_until(core.next_attempt_at)
            now = trio.current_time()
            failover = self.candidates is not None and core.fail_over_due(now)
            deadline = core.begin_attempt(now)
            self._set_phase_changed()
            targets = [self._target]
            if failover and self.candidates is not None:
                try:
                    others = await self.candidates()
                except QpcError as exc:
                    log.info("no failover candidates", extra={"why": str(exc)})
                    others = []
                targets = [*others, self._target]
            why = "timed out"
            permanent = False
            for target in targets:
                # With somewhere else to go, a dead node's handshake must not eat the
                # whole attempt (QUIC may only give up at the attempt's deadline).
                dial_by = deadline
                if self.candidates is not None:
                    dial_by = min(deadline, trio.current_time() + core.policy.failover_dial_timeout)
                ok, why, permanent = await self._attempt(target, authenticate, dial_by, deadline)
                if self.on_dial is not None and target.node_id is not None:
                    try:
                        await self.on_dial(target, ok)
                    except QpcError as exc:  # bookkeeping only: never blocks a reconnect
                        log.info("recording a dial failed", extra={"why": str(exc)})
                if ok:
                    return True
                if permanent and target is self._target:
                    break
                permanent = False  # a candidate's refusal is not our node's
            self._notify(core.attempt_failed(trio.current_time(), why, permanent=permanent))
            self._set_phase_changed()
            log.info("reconnect attempt failed", extra={"why": why, "failures": core.failures})
        return False

    async def _attempt(
        self, target: Target, authenticate: Authenticate, dial_by: float, deadline: float
    ) -> tuple[bool, str, bool]:
        """One dial + login on ``target``: (succeeded, why not, refused for good)."""
        core = self._core
        conn: Connection | None = None
        try:
            with trio.move_on_at(deadline):
                with trio.move_on_at(dial_by):
                    conn = await self._ep.connect(target.host, target.port, target.tls)
                if conn is None:
                    return False, f"{target.address}: timed out", False
                # The node keeps auth per connection: prove who we are on the new one
                # before any agent call may use it.
                server = ServerId.of(conn, target.address)
                await authenticate(
                    RpcClient(conn.open_stream, default_timeout=core.policy.attempt_timeout), server
                )
                old = self.server
                self._put(conn, target, server)
                now = trio.current_time()
                if old is not None and old.key != server.key:
                    self._notify(core.moved(now, old.short, server.short))
                else:
                    self._notify(core.attempt_succeeded(now))
                self._set_phase_changed()
                return True, "", False
            why = f"{target.address}: timed out"
            permanent = False
        except HandshakeError as exc:
            permanent = is_refusal(exc)
            why = exc.reason or str(exc)
        except (QpcError, OSError) as exc:  # OSError: no route, name lookup failed
            why = str(exc)
            permanent = False
        if conn is not None:
            await conn.aclose()
        return False, why, permanent

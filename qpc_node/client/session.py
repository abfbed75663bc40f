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

import math
import random
from collections.abc import Awaitable, Callable

import trio

from qpc_node.client.reconnect import Notice, Phase, Reconnector, ReconnectPolicy
from qpc_node.errors import QpcError, StatusCode
from qpc_node.ops.log import get_logger
from qpc_node.quic import ClientTLS, Connection, Endpoint, HandshakeError, QuicStream
from qpc_node.rpc import RpcClient

log = get_logger("qpc.client.session")

# QUIC CRYPTO_ERROR range (RFC 9001 4.8): a TLS alert. Against a node we reached
# before, that is its certificate failing our pin (or another TLS refusal); a
# retry cannot fix it and must not look like "the node is still down".
_CRYPTO_ERRORS = range(0x100, 0x200)

Authenticate = Callable[[RpcClient], Awaitable[None]]
AfterUp = Callable[[], Awaitable[None]]


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
    ) -> None:
        self._ep = endpoint
        self._host = host
        self._port = port
        self._tls = tls
        self._core = Reconnector(policy or ReconnectPolicy(), rand)
        self._conn: Connection | None = None
        self._changed = trio.Event()
        self.rpc = RpcClient(self.open_stream)
        self.on_notice: Callable[[Notice], None] = lambda _n: None

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

    async def connect(self) -> Connection:
        """The first connection: errors go to the caller (nothing to resume yet)."""
        conn = await self._ep.connect(self._host, self._port, self._tls)
        self._conn = conn
        return conn

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
        while True:
            conn = self._conn
            if conn is None:
                raise NotConnected("Session.run before the first connect()")
            await conn.closed.wait()
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
        """Attempt until one succeeds (True) or is refused for good (False)."""
        core = self._core
        while core.phase is Phase.WAITING:
            assert core.next_attempt_at is not None
            await trio.sleep_until(core.next_attempt_at)
            deadline = core.begin_attempt(trio.current_time())
            self._set_phase_changed()
            conn: Connection | None = None
            permanent = False
            try:
                with trio.move_on_at(deadline):
                    conn = await self._ep.connect(self._host, self._port, self._tls)
                    # The node keeps auth per connection: prove who we are on the
                    # new one before any agent call may use it.
                    await authenticate(
                        RpcClient(conn.open_stream, default_timeout=core.policy.attempt_timeout)
                    )
                    self._conn = conn
                    self._notify(core.attempt_succeeded(trio.current_time()))
                    self._set_phase_changed()
                    return True
                why = "timed out"
            except HandshakeError as exc:
                permanent = is_refusal(exc)
                why = exc.reason or str(exc)
            except (QpcError, OSError) as exc:  # OSError: no route, name lookup failed
                why = str(exc)
            if conn is not None:
                await conn.aclose()
            self._notify(core.attempt_failed(trio.current_time(), why, permanent=permanent))
            self._set_phase_changed()
            log.info("reconnect attempt failed", extra={"why": why, "failures": core.failures})
        return False

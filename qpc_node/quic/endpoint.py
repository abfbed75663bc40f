"""The node's QUIC endpoint: one datagram socket, many connections.

The receive loop wakes once per readable socket, drains up to ``RECV_BATCH``
datagrams, routes each by destination connection ID, feeds every touched
connection its share, and only then lets each transmit once -- so ACKs and
replies for a burst leave in one pass instead of one per datagram.

New connections are admitted only from Initial packets of a supported
version that decrypt, within :class:`AdmissionLimits`: half-open handshakes
and established connections have separate caps, half-open ones a short
deadline, and under load a client first proves its address with a stateless
Retry (:mod:`qpc_node.quic.admission` decides, this module does the I/O).
A short-header packet of no connection gets a stateless reset (rate-limited,
always smaller than its trigger), and one that *is* a reset for one of our
connections ends it. Everything else is dropped and counted.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from itertools import islice

import msgspec
import trio

from qpc_node.errors import LocalProtocolError
from qpc_node.quic._aioquic import AioquicBackend
from qpc_node.quic.address import Address, host_of
from qpc_node.quic.admission import (
    RESET_TOKEN_SIZE,
    Admission,
    AdmissionRefusals,
    ReplyBudget,
    ResetTokens,
    RetryTokens,
    Verdict,
    stateless_reset,
)
from qpc_node.quic.backend import PacketHeader, QuicBackend
from qpc_node.quic.connection import Connection, StreamHandler
from qpc_node.quic.errors import HandshakeError
from qpc_node.quic.settings import AdmissionLimits, QuicSettings
from qpc_node.quic.tls import ClientTLS, ServerTLS
from qpc_node.quic.transport import DatagramSocket, UdpSocket, batch_sender

log = logging.getLogger(__name__)

DEFAULT_PORT = 4201
RECV_BATCH = 256
TX_BACKLOG_MAX = 4096
TX_FLUSH_CHUNK = 256  # backlog datagrams handed to the socket per batch
MIN_INITIAL_SIZE = 1200  # RFC 9000 14.1: smaller client Initials are dropped


class EndpointStatistics(msgspec.Struct, frozen=True):
    connections: int
    server_connections: int
    rx_datagrams: int
    rx_batches: int
    tx_datagrams: int
    tx_backlog: int
    tx_dropped: int
    dropped_unparseable: int
    dropped_unknown_cid: int
    refused_admission: int
    connection_failures: int
    # TLS handshakes by role: confirmed (RFC 9001 4.1.2; the connection may have ended since)
    # and ended unconfirmed (refused certificate or ALPN, timeout, garbage)
    handshakes_ok_server: int
    handshakes_ok_client: int
    handshakes_failed_server: int
    handshakes_failed_client: int
    # admission under attack (issue 11): server connections by phase, what was
    # refused and why, and the stateless replies sent instead of keeping state
    half_open_connections: int
    dropped_undecryptable: int  # Initials that did not decrypt: no connection made
    half_open_timeouts: int
    retries_sent: int
    invalid_tokens: int
    resets_sent: int
    resets_suppressed: int  # too small a trigger, or over the rate
    resets_received: int
    refusals: AdmissionRefusals  # refused_admission by reason


class Endpoint:
    """Use :func:`open_endpoint`; the constructor is the plumbing."""

    def __init__(
        self,
        nursery: trio.Nursery,
        sock: DatagramSocket,
        *,
        server_tls: ServerTLS | None,
        admission: AdmissionLimits,
        settings: QuicSettings,
        backend: QuicBackend,
    ) -> None:
        self._nursery = nursery
        self._sock = sock
        self._send_batch = batch_sender(sock)
        self._server_tls = server_tls
        self._admission = admission
        self._settings = settings
        self._backend = backend
        self._routes: dict[bytes, Connection] = {}
        self._connections: set[Connection] = set()
        self._server_conns: set[Connection] = set()
        self._established: set[Connection] = set()  # server side, handshake confirmed
        self._gate = Admission(admission, RetryTokens())
        self._retry_budget = ReplyBudget(admission.retry_rate, admission.retry_rate)
        self._reset_budget = ReplyBudget(admission.reset_rate, admission.reset_rate)
        # The reset key must survive restarts: a node derives it from its TLS key.
        self._reset_tokens = (
            ResetTokens.from_secret(server_tls.credentials.private_key_pem)
            if server_tls is not None
            else ResetTokens.random()
        )
        # Peer's stateless reset token -> its connection (and back, to forget it).
        self._peer_tokens: dict[bytes, Connection] = {}
        self._token_of: dict[Connection, bytes] = {}
        self._handler: StreamHandler | None = None
        self._accepting = False
        self._closing = False
        self._tx_backlog: deque[tuple[bytes, Address]] = deque()
        self._tx_pending = trio.Event()
        self._rx_datagrams = 0
        self._rx_batches = 0
        self._tx_datagrams = 0
        self._tx_dropped = 0
        self._unparseable = 0
        self._unknown_cid = 0
        self._refused = 0
        self._conn_failures = 0
        # index 0: accepted (server role), 1: dialled (client role); of finished connections
        self._hs_ok_finished = [0, 0]
        self._hs_failed = [0, 0]
        self._undecryptable = 0
        self._half_open_timeouts = 0
        self._retries = 0
        self._invalid_tokens = 0
        self._resets_sent = 0
        self._resets_suppressed = 0
        self._resets_received = 0

    # ------------------------------------------------------------------ public
    @property
    def local_address(self) -> Address:
        return self._sock.local_address

    async def serve(
        self,
        stream_handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections and run ``stream_handler`` per peer-initiated stream.

        Returns only when cancelled (then new connections are no longer accepted;
        established ones keep going until the endpoint closes).
        """
        if self._server_tls is None:
            raise LocalProtocolError("serve() needs open_endpoint(server_tls=...)")
        if self._closing:
            raise LocalProtocolError("endpoint is closing")
        self._handler = stream_handler
        self._accepting = True
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self._accepting = False

    def set_admission_limits(self, limits: AdmissionLimits) -> None:
        """Apply new connection caps live (config reload). Connections already admitted
        stay; the new caps decide from the next Initial on, and a half-open connection
        keeps the deadline it was given. The reply budgets (Retry/reset rates) are not
        config keys and stay as started."""
        self._admission = limits
        self._gate.limits = limits

    async def connect(self, host: str, port: int, client_tls: ClientTLS) -> Connection:
        """Dial ``host``; returns once the server has confirmed the handshake.

        Before confirmation a TLS 1.3 client only *thinks* it is connected: the
        server may still refuse our certificate. Raises :class:`HandshakeError`.
        """
        if self._closing:
            raise LocalProtocolError("endpoint is closing")
        addr = await self._sock.resolve(host, port)
        core = self._backend.create_client(
            client_tls, self._settings, reset_tokens=self._reset_tokens
        )
        conn = Connection(self, core, addr, self._settings)
        conn.register_cid(core.host_cid)
        core.connect(addr, trio.current_time())
        self._connections.add(conn)
        await self._nursery.start(conn.run)
        try:
            with trio.move_on_after(self._settings.handshake_timeout):
                await conn.wait_confirmed()
        finally:
            if not conn.confirmed:
                conn.close_now(0, "handshake abandoned")
        if not conn.confirmed:
            err = conn.close_error
            raise HandshakeError(
                f"handshake with {host}:{port} failed: {err or 'timeout'}",
                error_code=err.error_code if err else 0,
                reason=err.reason if err else "timeout",
            )
        return conn

    async def close(
        self, *, grace: float = 5.0, error_code: int = 0, reason: str = "shutdown"
    ) -> None:
        """Graceful shutdown: refuse new connections and streams, give running
        handlers ``grace`` seconds, then CONNECTION_CLOSE everything."""
        self._closing = True
        self._accepting = False
        for conn in list(self._connections):
            conn.begin_drain()
        with trio.move_on_after(grace):
            for conn in list(self._connections):
                await conn.wait_idle()
        self.abort(error_code, reason)

    async def aclose(self) -> None:
        await self.close()

    def abort(self, error_code: int = 0, reason: str = "shutdown") -> None:
        """Close every connection now (CONNECTION_CLOSE is sent) and stop the endpoint."""
        self._closing = True
        self._accepting = False
        for conn in list(self._connections):
            conn.close_now(error_code, reason)
        self._nursery.cancel_scope.cancel()

    def connections(self) -> list[Connection]:
        return list(self._connections)

    def statistics(self) -> EndpointStatistics:
        ok = list(self._hs_ok_finished)
        for c in self._connections:  # O(open connections), at scrape time only
            if c.confirmed:
                ok[c.is_client] += 1
        return EndpointStatistics(
            connections=len(self._connections),
            server_connections=len(self._server_conns),
            rx_datagrams=self._rx_datagrams,
            rx_batches=self._rx_batches,
            tx_datagrams=self._tx_datagrams,
            tx_backlog=len(self._tx_backlog),
            tx_dropped=self._tx_dropped,
            dropped_unparseable=self._unparseable,
            dropped_unknown_cid=self._unknown_cid,
            refused_admission=self._refused,
            connection_failures=self._conn_failures,
            handshakes_ok_server=ok[0],
            handshakes_ok_client=ok[1],
            handshakes_failed_server=self._hs_failed[0],
            handshakes_failed_client=self._hs_failed[1],
            half_open_connections=self._gate.half_open,
            dropped_undecryptable=self._undecryptable,
            half_open_timeouts=self._half_open_timeouts,
            retries_sent=self._retries,
            invalid_tokens=self._invalid_tokens,
            resets_sent=self._resets_sent,
            resets_suppressed=self._resets_suppressed,
            resets_received=self._resets_received,
            refusals=self._gate.refusals(),
        )

    # ------------------------------------------------- ConnectionHost protocol
    def send_datagrams(self, datagrams: list[tuple[bytes, Address]]) -> None:
        backlog = self._tx_backlog
        i = 0
        if not backlog:
            i = self._send_batch(datagrams)
            self._tx_datagrams += i
        if i < len(datagrams):
            room = TX_BACKLOG_MAX - len(backlog)
            rest = datagrams[i:]
            backlog.extend(rest[:room])
            self._tx_dropped += max(0, len(rest) - room)  # UDP: QUIC recovers the loss
            self._tx_pending.set()

    def register_cid(self, cid: bytes, conn: Connection) -> None:
        self._routes[cid] = conn

    def unregister_cid(self, cid: bytes, conn: Connection) -> None:
        if self._routes.get(cid) is conn:
            del self._routes[cid]

    def stream_handler(self) -> StreamHandler | None:
        return self._handler

    def connection_confirmed(self, conn: Connection) -> bool:
        if conn in self._server_conns:
            if not self._gate.promote(host_of(conn.remote_address)):
                self._refused += 1
                return False
            self._established.add(conn)
        token = conn.peer_reset_token
        if token is not None:
            self._peer_tokens[token] = conn
            self._token_of[conn] = token
        return True

    def connection_finished(self, conn: Connection) -> None:
        if conn in self._connections:
            (self._hs_ok_finished if conn.confirmed else self._hs_failed)[conn.is_client] += 1
            self._half_open_timeouts += conn.half_open_expired
        self._connections.discard(conn)
        token = self._token_of.pop(conn, None)
        if token is not None and self._peer_tokens.get(token) is conn:
            del self._peer_tokens[token]
        if conn in self._server_conns:
            self._server_conns.discard(conn)
            established = conn in self._established
            self._established.discard(conn)
            self._gate.finished(host_of(conn.remote_address), established=established)

    # ------------------------------------------------------------------ loops
    async def _receive_loop(self) -> None:
        sock = self._sock
        parse = self._backend.parse_header
        while True:
            await sock.wait_readable()
            batch = sock.recv_batch(RECV_BATCH)
            if not batch:
                continue
            now = trio.current_time()
            self._rx_batches += 1
            self._rx_datagrams += len(batch)
            touched: dict[Connection, list[tuple[bytes, Address]]] = {}
            for data, addr in batch:
                header = parse(data)
                if header is None:
                    self._unparseable += 1
                    continue
                conn = self._routes.get(header.destination_cid)
                if conn is None:
                    conn = self._unrouted(header, data, addr, now)
                    if conn is None:
                        continue
                touched.setdefault(conn, []).append((data, addr))
            for conn, datagrams in touched.items():
                self._guarded(conn, conn.feed, datagrams, now)
            for conn in touched:
                self._guarded(conn, conn.transmit, now)
                conn._kick()

    def _guarded(self, conn: Connection, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        # Supervisor boundary: a core bug triggered by one peer's packets must cost
        # that connection, not the node. Protocol violations never get here (the
        # core turns them into CONNECTION_CLOSE itself).
        except Exception:
            self._conn_failures += 1
            log.exception("QUIC core failed on %r; dropping the connection", conn)
            conn.close_now(0x1, "internal error")  # INTERNAL_ERROR

    async def _send_loop(self) -> None:
        """Flush datagrams the kernel refused (EAGAIN) once the socket is writable."""
        backlog = self._tx_backlog
        while True:
            await self._tx_pending.wait()
            self._tx_pending = trio.Event()
            while backlog:
                await self._sock.wait_writable()
                while backlog:
                    chunk = list(islice(backlog, TX_FLUSH_CHUNK))
                    sent = self._send_batch(chunk)
                    for _ in range(sent):
                        backlog.popleft()
                    self._tx_datagrams += sent
                    if sent < len(chunk):
                        break

    def _unrouted(
        self, header: PacketHeader, data: bytes, addr: Address, now: float
    ) -> Connection | None:
        """A datagram matching no connection ID: a new client, a reset, or nothing."""
        if header.version is None:
            self._short_unrouted(header, data, addr, now)
            return None
        tls = self._server_tls
        if (
            tls is None
            or not self._accepting
            or not header.is_initial
            or not header.version_supported
            or len(data) < MIN_INITIAL_SIZE
        ):
            self._unknown_cid += 1
            return None
        if not self._backend.initial_decrypts(data):
            self._undecryptable += 1  # random bytes: no state, no reply
            return None
        ip = host_of(addr)
        decision = self._gate.decide(addr, ip, header.destination_cid, header.token, now)
        if decision.verdict is Verdict.RETRY:
            if self._retry_budget.take(now):
                scid = self._backend.new_cid()
                token = self._gate.tokens.mint(addr, header.destination_cid, scid, now)
                self.send_datagrams([(self._backend.retry_packet(header, scid, token), addr)])
                self._retries += 1
            else:
                self._gate.refuse("retry_rate")
                self._refused += 1
            return None
        if decision.verdict is not Verdict.ADMIT:
            self._refused += 1
            if decision.verdict is Verdict.INVALID_TOKEN:
                self._invalid_tokens += 1
                if self._reset_budget.take(now):
                    self.send_datagrams([(self._backend.invalid_token_close(header), addr)])
            return None
        core = self._backend.create_server(
            tls,
            self._settings,
            decision.original_dcid,
            retry_source_cid=decision.retry_source_cid,
            reset_tokens=self._reset_tokens,
        )
        conn = Connection(self, core, addr, self._settings)
        conn.half_open_deadline = now + self._admission.half_open_timeout
        conn.register_cid(header.destination_cid)
        conn.register_cid(core.host_cid)
        self._connections.add(conn)
        self._server_conns.add(conn)
        self._gate.opened(ip)
        self._nursery.start_soon(conn.run)
        return conn

    def _short_unrouted(self, header: PacketHeader, data: bytes, addr: Address, now: float) -> None:
        """A 1-RTT packet of no connection: a peer's reset for us, or we lost its state.

        RFC 9000 10.3: our reset carries the token the (maybe previous) process
        gave for that CID, derived from the static key, so the peer stops at once
        instead of waiting out its idle timeout.
        """
        self._unknown_cid += 1
        if len(data) > RESET_TOKEN_SIZE:
            conn = self._peer_tokens.get(data[-RESET_TOKEN_SIZE:])
            if conn is not None and conn.peer_reset_token == data[-RESET_TOKEN_SIZE:]:
                self._resets_received += 1
                self._guarded(conn, conn.stateless_reset_received)
                return  # never answer a reset with a reset
        packet = stateless_reset(self._reset_tokens.token(header.destination_cid), len(data))
        if packet is None or not self._reset_budget.take(now):
            self._resets_suppressed += 1
            return
        self.send_datagrams([(packet, addr)])
        self._resets_sent += 1


@asynccontextmanager
async def open_endpoint(
    host: str = "::",
    port: int = DEFAULT_PORT,
    *,
    server_tls: ServerTLS | None = None,
    admission: AdmissionLimits | None = None,
    settings: QuicSettings | None = None,
    sock: DatagramSocket | None = None,
    backend: QuicBackend | None = None,
) -> AsyncIterator[Endpoint]:
    """Bind one socket (``port=0``: ephemeral) and run the endpoint's tasks.

    ``sock`` replaces the UDP socket (the fake network in tests). Leaving the
    block closes every connection at once; call :meth:`Endpoint.close` first for
    a graceful drain.
    """
    the_sock = sock if sock is not None else UdpSocket.bind(host, port)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as outer:
            # The endpoint's tasks live in an inner nursery so that closing the
            # endpoint cancels them, never the caller's body.
            inner: trio.Nursery = await outer.start(_service_nursery)
            ep = Endpoint(
                inner,
                the_sock,
                server_tls=server_tls,
                admission=admission or AdmissionLimits(),
                settings=settings or QuicSettings(),
                backend=backend or AioquicBackend(),
            )
            inner.start_soon(ep._receive_loop)
            inner.start_soon(ep._send_loop)
            try:
                yield ep
            # Re-raised below, outside the nursery, so the caller gets its own
            # exception and not an ExceptionGroup wrapping it.
            except BaseException as exc:
                body_error = exc
            finally:
                ep.abort()
    finally:
        the_sock.close()
    if body_error is not None:
        raise body_error


async def _service_nursery(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()

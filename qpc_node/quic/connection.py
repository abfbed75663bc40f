"""One QUIC connection: a sans-IO core plus the Trio task that drives it.

The driver loop is the whole I/O policy: transmit what the core has, drain its
events, arm one timer (the core's loss/idle timer or our keepalive, whichever
is first), wait for that or a kick. When the timer fires the core gets
``now = max(deadline, current_time())`` -- never an earlier time, which the
core would treat as "not yet" and re-arm forever.

Peer-initiated streams run ``stream_handler`` in a task of this connection's
own nursery: a handler that raises resets only its stream; a connection that
dies cancels only its handlers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec
import trio

from qpc_node.errors import LocalProtocolError, StatusCode
from qpc_node.quic import events as ev
from qpc_node.quic.address import Address, format_address
from qpc_node.quic.backend import QuicCore
from qpc_node.quic.errors import ConnectionClosed
from qpc_node.quic.settings import QuicSettings
from qpc_node.quic.stream import QuicStream
from qpc_node.quic.tls import PeerIdentity

log = logging.getLogger(__name__)

# The core decides "lost" with `sent_time <= now - delay` but arms its timer at
# `sent_time + delay`: in floating point the two can disagree by one ulp, and a
# virtual clock (which never drifts past a deadline by itself) would spin on it.
TIMER_EPSILON = 1e-6

StreamHandler = Callable[["Connection", QuicStream], Awaitable[None]]


class ConnectionHost(Protocol):
    """What a connection needs from its endpoint (routing table, socket, handler)."""

    def send_datagrams(self, datagrams: list[tuple[bytes, Address]]) -> None: ...

    def register_cid(self, cid: bytes, conn: Connection) -> None: ...

    def unregister_cid(self, cid: bytes, conn: Connection) -> None: ...

    def stream_handler(self) -> StreamHandler | None: ...

    def connection_finished(self, conn: Connection) -> None: ...

    def connection_confirmed(self, conn: Connection) -> bool:
        """The handshake is confirmed; False: no room for it (it is dropped)."""
        ...


class ConnectionStatistics(msgspec.Struct, frozen=True):
    open_streams: int
    active_handlers: int
    streams_waiting_for_credit: int
    receive_buffered_bytes: int
    send_buffered_bytes: int
    rx_datagrams: int
    tx_datagrams: int
    keepalives_sent: int
    streams_refused: int
    handler_errors: int


class _PeerStreamIds:
    """Which peer-initiated stream ids we have already seen, in O(reorder window).

    Late data for a stream we already closed must not resurrect it as "new".
    """

    def __init__(self) -> None:
        self._floor = 0  # every index below has been seen
        self._above: set[int] = set()

    def add(self, stream_id: int) -> bool:
        idx = stream_id // 4
        if idx < self._floor or idx in self._above:
            return False
        self._above.add(idx)
        while self._floor in self._above:
            self._above.discard(self._floor)
            self._floor += 1
        return True


class Connection:
    """A QUIC connection of the endpoint (client- or server-side)."""

    def __init__(
        self,
        host: ConnectionHost,
        core: QuicCore,
        remote_address: Address,
        settings: QuicSettings,
    ) -> None:
        self._host = host
        self._core = core
        self._settings = settings
        self.remote_address = remote_address
        self._streams: dict[int, QuicStream] = {}
        self._peer_ids = _PeerStreamIds()
        self._cids: set[bytes] = set()
        self._wake = trio.Event()
        self._open_lot = trio.lowlevel.ParkingLot()
        self._send_waiters: set[QuicStream] = set()
        self._idle_lot = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self._unstarted: list[QuicStream] = []
        self.closed = trio.Event()
        self._confirmed = trio.Event()
        self._error: ConnectionClosed | None = None
        self._core_terminated = False
        self._discarded = False
        # Server side, until confirmed: when the handshake must be done by, and
        # the connection is dropped (after its CONNECTION_CLOSE) once it closes.
        self.half_open_deadline: float | None = None
        self.half_open_expired = False
        self._draining = False
        self._alpn: str | None = None
        self._peer_identity: PeerIdentity | None = None
        self._peer_chain: tuple[bytes, ...] = ()
        self._core_now = trio.current_time()
        self._last_rx = self._core_now
        self._last_ping = -math.inf
        self._ping_uid = 0
        self._active_handlers = 0
        self._rx_datagrams = 0
        self._tx_datagrams = 0
        self._keepalives = 0
        self._refused = 0
        self._handler_errors = 0

    def __repr__(self) -> str:
        return f"<Connection {format_address(self.remote_address)} alpn={self._alpn}>"

    # ------------------------------------------------------------------ public
    @property
    def alpn(self) -> str:
        return self._alpn or ""

    @property
    def peer_identity(self) -> PeerIdentity | None:
        """The peer's verified certificate identity (servers: None for ``qpc/1``)."""
        return self._peer_identity

    @property
    def peer_certificate_chain(self) -> tuple[bytes, ...]:
        """The peer's verified certificates (DER, leaf first); empty without one.

        For policies that name a peer by more than the fingerprint (the mesh's
        node id is the leaf's public key; managed mode re-checks the chain)."""
        return self._peer_chain

    @property
    def is_client(self) -> bool:
        return self._core.is_client

    @property
    def close_error(self) -> ConnectionClosed | None:
        """Why the connection ended (None while it is open)."""
        return self._error

    async def open_stream(self) -> QuicStream:
        """A new bidirectional stream; waits while the peer's MAX_STREAMS is used up."""
        await trio.lowlevel.checkpoint_if_cancelled()
        parked = False
        while True:
            if self._error is not None:
                raise self._error
            if self._draining:
                raise ConnectionClosed("connection is draining", reason="draining")
            if self._core.can_open_stream():
                break
            parked = True
            await self._open_lot.park()
        stream = QuicStream(self, self._core.open_stream())
        self._streams[stream.stream_id] = stream
        if self._core.can_open_stream():
            self._open_lot.unpark()  # pass the credit on to the next waiter
        if not parked:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return stream

    async def aclose(self, error_code: int = 0, reason: str = "") -> None:
        """Send CONNECTION_CLOSE now; streams and handlers see ConnectionClosed."""
        self.close_now(error_code, reason)
        await trio.lowlevel.checkpoint()

    @property
    def peer_reset_token(self) -> bytes | None:
        """What a stateless reset from our peer ends with (known once the handshake is)."""
        return self._core.peer_reset_token

    def stateless_reset_received(self) -> None:
        """The endpoint matched a datagram to our peer's reset token: we are gone there."""
        self._core.stateless_reset_received()
        self._process_events()
        self._kick()

    def discard(self, error_code: int, reason: str) -> None:
        """Send one CONNECTION_CLOSE and end now, freeing everything at once.

        For a handshake that never became a connection (deadline passed, no
        room when it completed): no closing period keeps its slot or memory.
        """
        self.close_now(error_code, reason)
        self._discarded = True
        self._kick()

    def close_now(self, error_code: int = 0, reason: str = "") -> None:
        check_error_code(error_code)
        if self._error is None:
            self._core.close(error_code, reason)
            self._fail(
                ConnectionClosed(
                    f"closed by us: {reason or error_code}", error_code=error_code, reason=reason
                )
            )
            self.transmit(trio.current_time())
        self._kick()

    def statistics(self) -> ConnectionStatistics:
        send_buffered = sum(self._core.send_backlog(sid) for sid in self._streams)
        return ConnectionStatistics(
            open_streams=len(self._streams),
            active_handlers=self._active_handlers,
            streams_waiting_for_credit=len(self._open_lot),
            receive_buffered_bytes=self._core.receive_buffered,
            send_buffered_bytes=send_buffered,
            rx_datagrams=self._rx_datagrams,
            tx_datagrams=self._tx_datagrams,
            keepalives_sent=self._keepalives,
            streams_refused=self._refused,
            handler_errors=self._handler_errors,
        )

    # ---------------------------------------------------------- endpoint side
    def feed(self, datagrams: list[tuple[bytes, Address]], now: float) -> None:
        """Hand a batch of received datagrams to the core (no transmit here)."""
        now = self._now(now)
        self._last_rx = now
        self._rx_datagrams += len(datagrams)
        for data, addr in datagrams:
            self._core.receive_datagram(data, addr, now)
        self._process_events()

    def transmit(self, now: float) -> None:
        datagrams = self._core.datagrams_to_send(self._now(now))
        self._process_events()  # CIDs are issued while the datagrams are built
        if datagrams:
            self._tx_datagrams += len(datagrams)
            self._host.send_datagrams(datagrams)

    def register_cid(self, cid: bytes) -> None:
        self._cids.add(cid)
        self._host.register_cid(cid, self)

    def begin_drain(self) -> None:
        """Refuse new streams from now on; running handlers may finish."""
        self._draining = True
        self._open_lot.unpark_all()

    async def wait_idle(self) -> None:
        """Until no handler runs and no stream of ours is open (or we are closed)."""
        while not self._idle() and self._error is None:
            await self._idle_lot.park()
        await trio.lowlevel.checkpoint()

    async def wait_confirmed(self) -> None:
        """Until the handshake is confirmed or the connection is gone."""
        async with trio.open_nursery() as nursery:

            async def first(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(first, self._confirmed)
            nursery.start_soon(first, self.closed)

    @property
    def confirmed(self) -> bool:
        return self._confirmed.is_set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The connection's life: its nursery hosts the driver and stream handlers."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for stream in self._unstarted:
                    self._spawn_handler(stream)
                self._unstarted.clear()
                task_status.started()
                await self._drive()
                nursery.cancel_scope.cancel()  # connection is gone: so is their work
        finally:
            if self._error is None and not self._core_terminated:
                # Cancelled while open (endpoint or node stopping): say so with a
                # CONNECTION_CLOSE, or the peer waits out its idle timeout for us.
                self.close_now(0, "connection ended")
            self._fail(ConnectionClosed("connection ended"))
            for cid in self._cids:
                self._host.unregister_cid(cid, self)
            self._cids.clear()
            self._host.connection_finished(self)

    # ----------------------------------------------------------------- driver
    def _kick(self) -> None:
        self._wake.set()

    async def _drive(self) -> None:
        slack = self._settings.timer_slack
        due: float | None = None  # set when a deadline fired: the core's "now"
        while True:
            self._wake = trio.Event()
            # ACK and pacing deadlines are served by datagrams_to_send(now), not
            # handle_timer: both must see the deadline, or the core re-arms it.
            self.transmit(self._now(due))
            due = None
            if self._core_terminated or self._discarded:
                return
            if self._error is not None and self.half_open_deadline is not None:
                return  # a handshake that failed: its CONNECTION_CLOSE is out, nothing to keep
            deadline = self._deadline()
            if deadline - trio.current_time() > slack:
                with trio.move_on_at(deadline) as scope:
                    await self._wake.wait()
                if not scope.cancelled_caught:
                    continue
            else:
                await trio.lowlevel.checkpoint()  # fairness: let the receive loop run
            due = self._now(max(deadline + TIMER_EPSILON, trio.current_time()))
            self._on_timers(due)

    def _now(self, t: float | None = None) -> float:
        """Monotonic per connection: firing a deadline within ``timer_slack`` runs
        the core slightly ahead of the clock; never hand it an earlier time after."""
        now = trio.current_time() if t is None else t
        if now < self._core_now:
            now = self._core_now
        self._core_now = now
        return now

    def _deadline(self) -> float:
        timer = self._core.get_timer()
        keepalive = self._keepalive_at()
        half_open = math.inf if self.half_open_deadline is None else self.half_open_deadline
        return min(math.inf if timer is None else timer, keepalive, half_open)

    def _keepalive_at(self) -> float:
        if not self._confirmed.is_set() or self._error is not None:
            return math.inf
        return max(self._last_rx, self._last_ping) + self._settings.keepalive_seconds

    def _on_timers(self, now: float) -> None:
        if self.half_open_deadline is not None and self.half_open_deadline <= now:
            self.half_open_expired = True
            self.discard(0x2, "handshake timeout")  # CONNECTION_REFUSED
            return
        if self._keepalive_at() <= now:
            self._ping_uid += 1
            self._core.send_ping(self._ping_uid)
            self._last_ping = now
            self._keepalives += 1
        timer = self._core.get_timer()
        if timer is not None and timer <= now:
            self._core.handle_timer(now)
            self._process_events()

    # ----------------------------------------------------------------- events
    def _process_events(self) -> None:
        core = self._core
        refused = False
        while (e := core.next_event()) is not None:
            if isinstance(e, ev.StreamDataReceived):
                self._on_stream_data(e)
            elif isinstance(e, ev.StreamReset):
                stream = self._streams.get(e.stream_id)
                if stream is not None:
                    stream._on_reset(e.error_code)
                else:
                    core.stream_released(e.stream_id)
            elif isinstance(e, ev.StopSendingReceived):
                stream = self._streams.get(e.stream_id)
                if stream is not None:
                    stream._on_stop_sending(e.error_code)
            elif isinstance(e, ev.ConnectionIdIssued):
                self.register_cid(e.connection_id)
            elif isinstance(e, ev.ConnectionIdRetired):
                self._cids.discard(e.connection_id)
                self._host.unregister_cid(e.connection_id, self)
            elif isinstance(e, ev.HandshakeCompleted):
                self._on_handshake_completed(e)
            elif isinstance(e, ev.HandshakeConfirmed):
                if self._host.connection_confirmed(self):
                    self.half_open_deadline = None
                    self._confirmed.set()
                else:
                    refused = True
            elif isinstance(e, ev.ConnectionClosing | ev.ConnectionTerminated):
                self._core_terminated |= isinstance(e, ev.ConnectionTerminated)
                self._fail(
                    ConnectionClosed(
                        f"connection closed: code=0x{e.error_code:x} {e.reason!r}",
                        error_code=e.error_code,
                        reason=e.reason,
                    )
                )
        self._wake_waiters()
        if refused:
            self.discard(0x2, "server full")  # CONNECTION_REFUSED

    def _on_handshake_completed(self, e: ev.HandshakeCompleted) -> None:
        self._alpn = e.alpn
        chain = self._core.peer_certificate_chain()
        self._peer_chain = tuple(chain)
        self._peer_identity = PeerIdentity.from_der(chain[0]) if chain else None

    def _on_stream_data(self, e: ev.StreamDataReceived) -> None:
        stream = self._streams.get(e.stream_id)
        if stream is None:
            peer_initiated = (e.stream_id & 1) == (1 if self.is_client else 0)
            if not peer_initiated or not self._peer_ids.add(e.stream_id):
                self._core.stream_released(e.stream_id)  # late data for a closed stream
                return
            stream = QuicStream(self, e.stream_id)
            self._streams[e.stream_id] = stream
            if self._draining or self._error is not None or self._host.stream_handler() is None:
                self._refused += 1
                stream.reset(StatusCode.UNAVAILABLE)
                return
            if self._nursery is None:
                self._unstarted.append(stream)
            else:
                self._spawn_handler(stream)
        stream._on_data(e.data, e.end_stream)

    def _spawn_handler(self, stream: QuicStream) -> None:
        assert self._nursery is not None
        self._active_handlers += 1
        self._nursery.start_soon(self._run_handler, stream, name=f"quic-stream-{stream.stream_id}")

    async def _run_handler(self, stream: QuicStream) -> None:
        handler = self._host.stream_handler()
        try:
            if handler is None:
                stream.reset(StatusCode.UNAVAILABLE)
                return
            try:
                await handler(self, stream)
            # Supervisor boundary: whatever a handler raises is its stream's failure,
            # never the connection's or the node's (contract of Endpoint.serve).
            except Exception:
                self._handler_errors += 1
                log.exception("stream handler failed on %r", stream)
                stream.reset(StatusCode.INTERNAL)
            else:
                if not stream.closed:  # handlers usually close it; skip a scheduler pass
                    await stream.aclose()
        finally:
            if not stream.closed:
                stream.reset(StatusCode.CANCELLED)
            self._active_handlers -= 1
            self._idle_lot.unpark_all()

    # ---------------------------------------------------- stream bookkeeping
    def _alive(self) -> bool:
        return self._error is None

    def _consumed(self, stream: QuicStream, nbytes: int) -> None:
        self._core.stream_consumed(stream.stream_id, nbytes)
        self._kick()  # a window update may be due

    def _maybe_forget(self, stream: QuicStream) -> None:
        if stream._both_done():
            self._forget(stream)

    def _forget(self, stream: QuicStream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            self._core.stream_released(stream.stream_id)
            self._send_waiters.discard(stream)
            self._idle_lot.unpark_all()

    def _idle(self) -> bool:
        return self._active_handlers == 0 and not self._streams

    def _wake_waiters(self) -> None:
        room = self._settings.send_high_water
        for stream in list(self._send_waiters):
            if self._core.send_backlog(stream.stream_id) < room:
                stream._send_lot.unpark_all()
        if self._open_lot and self._core.can_open_stream():
            self._open_lot.unpark()

    def _fail(self, exc: ConnectionClosed) -> None:
        if self._error is not None:
            return
        self._error = exc
        for stream in list(self._streams.values()):
            stream._on_connection_closed(exc)
        self._open_lot.unpark_all()
        self._idle_lot.unpark_all()
        self.closed.set()


def check_error_code(code: int) -> int:
    if not 0 <= code < 1 << 62:
        raise LocalProtocolError(f"invalid QUIC error code {code}")
    return code

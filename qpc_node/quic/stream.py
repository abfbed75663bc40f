"""One bidirectional QUIC stream as a :class:`trio.abc.HalfCloseableStream`.

Memory is bounded in both directions:

* **receive**: bytes the reader has not consumed stay in our buffer, but the
  core only extends the peer's flow-control window as :meth:`receive_some`
  consumes, so the buffer never exceeds the stream window (settings).
* **send**: :meth:`send_all` feeds the core at most ``send_high_water`` bytes
  ahead of what the peer acknowledged, then waits.

Cancellation: a task cancelled while blocked in :meth:`receive_some` has taken
no data, so the stream stays usable. A cancelled :meth:`send_all` may have
handed part of the data to the core; as for any Trio stream the send side is
then in an unknown state and should be :meth:`reset` or :meth:`aclose`\\ d.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from qpc_node.errors import LocalProtocolError, StatusCode
from qpc_node.quic.errors import ConnectionClosed, StreamReset

if TYPE_CHECKING:
    from qpc_node.quic.connection import Connection

DEFAULT_RECEIVE_BYTES = 64 * 1024


class QuicStream(trio.abc.HalfCloseableStream):
    def __init__(self, conn: Connection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._recv_eof = False  # peer's FIN has been queued behind the data
        self._recv_error: StreamReset | ConnectionClosed | None = None
        self._send_error: StreamReset | ConnectionClosed | None = None
        self._eof_sent = False
        self._closed = False  # by us: aclose() or reset()
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._receiving = False
        self._sending = False
        self._rx_watcher: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<QuicStream {self.stream_id} of {self._conn!r}>"

    # ------------------------------------------------------------------ receive
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)  # TypeError for 1.5, as Trio expects
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            parked = False
            while not self._chunks:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed by us")
                if self._recv_error is not None:
                    raise self._recv_error
                if self._recv_eof:
                    break
                parked = True
                await self._recv_lot.park()  # cancellation here takes no data
            data = self._take(max_bytes or DEFAULT_RECEIVE_BYTES)
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    def receive_nowait(self, max_bytes: int = DEFAULT_RECEIVE_BYTES) -> bytes | None:
        """What :meth:`receive_some` would return now, or None if it would wait.

        No checkpoint and no waiting: for a reader that arms a timer only when it
        must wait (an RPC server reading a request that has already arrived).
        Raises as :meth:`receive_some` does on a closed or reset stream.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        if not self._chunks:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed by us")
            if self._recv_error is not None:
                raise self._recv_error
            if not self._recv_eof:
                return None
        return self._take(max_bytes)

    def _take(self, max_bytes: int) -> bytes:
        if not self._chunks:
            self._conn._maybe_forget(self)
            return b""
        parts: list[bytes] = []
        n = 0
        while self._chunks and n < max_bytes:
            chunk = self._chunks.popleft()
            room = max_bytes - n
            if len(chunk) > room:
                self._chunks.appendleft(chunk[room:])
                chunk = chunk[:room]
            parts.append(chunk)
            n += len(chunk)
        self._buffered -= n
        self._conn._consumed(self, n)
        self._conn._maybe_forget(self)
        return b"".join(parts)

    def watch_receive(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` once, as soon as the receive side holds more than a
        clean end of stream: data, a reset, the connection's loss or our own close
        (at once if it already does). Returns a function that ends the watch.

        For a reader that expects nothing but end-of-stream for a while (an RPC
        server while its handler runs): it notices a peer giving up without a
        task parked in :meth:`receive_some`. The callback runs synchronously from
        the connection's event processing and must not block or raise; what
        arrived is left for :meth:`receive_some` to report.
        """
        self._rx_watcher = callback
        if self._rx_pending():
            self._notify_watcher()

        def unwatch() -> None:
            if self._rx_watcher is callback:
                self._rx_watcher = None

        return unwatch

    def _rx_pending(self) -> bool:
        return bool(self._chunks) or self._recv_error is not None or self._closed

    def _notify_watcher(self) -> None:
        callback = self._rx_watcher
        if callback is not None:
            self._rx_watcher = None
            callback()

    # --------------------------------------------------------------------- send
    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed by us")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was already called")
        if self._send_error is not None:
            raise self._send_error

    def _room(self) -> int:
        return self._conn._settings.send_high_water - self._conn._core.send_backlog(self.stream_id)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_send()
            view = memoryview(data)
            parked = False
            while view:
                room = self._room()
                if room <= 0:
                    parked = True
                    await self._park_sender()
                    self._check_send()
                    continue
                self._conn._core.send_stream_data(self.stream_id, bytes(view[:room]))
                view = view[room:]
                self._conn._kick()
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_final(self, data: bytes | bytearray | memoryview) -> None:
        """``send_all(data)``, end our side with the last bytes, and close the stream.

        For a responder whose peer has sent everything it will read (an RPC
        server after the request): the FIN rides in the frame of the last bytes
        (no separate frame or packet for it) and, unlike :meth:`aclose`, no
        STOP_SENDING is sent -- the peer ends its side with its own FIN (or a
        reset), which costs it one frame instead of the STOP_SENDING plus the
        RESET_STREAM it would answer with. Anything the peer still sends is
        discarded and credited back, as for any stream we closed; the peer's
        stream credit stays taken until it ends its side, so a peer that never
        does only uses up its own credit.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_send()
            view = memoryview(data)
            while len(view) > (room := self._room()):
                if room > 0:
                    self._conn._core.send_stream_data(self.stream_id, bytes(view[:room]))
                    view = view[room:]
                    self._conn._kick()
                await self._park_sender()
                self._check_send()
            self._conn._core.send_stream_data(self.stream_id, bytes(view), end_stream=True)
            self._eof_sent = True
        finally:
            self._sending = False
        self._close_locally()  # as aclose() does, minus the STOP_SENDING
        await trio.lowlevel.cancel_shielded_checkpoint()

    def try_send_final(self, data: bytes | bytearray | memoryview) -> bool:
        """:meth:`send_final` if it would not wait: True when ``data`` fitted under
        the send high-water mark and went out with the FIN (the stream is closed);
        False, with nothing sent, when it would have to wait for the peer.

        For a responder that arms a send timer only when it must wait. Raises as
        :meth:`send_final` does on a closed or reset stream.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._check_send()
        if len(data) > self._room():
            return False
        self._conn._core.send_stream_data(self.stream_id, bytes(data), end_stream=True)
        self._eof_sent = True
        self._close_locally()
        return True

    async def _park_sender(self) -> None:
        self._conn._send_waiters.add(self)
        try:
            await self._send_lot.park()
        finally:
            self._conn._send_waiters.discard(self)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed or self._eof_sent:
            await trio.lowlevel.cancel_shielded_checkpoint()
            raise trio.ClosedResourceError("stream was closed by us")
        if self._send_error is not None or self._room() > 0:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return  # send_all will not block (it will raise, or has room)
        await self._park_sender()

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint()
        if self._eof_sent:
            return
        if self._closed:
            raise trio.ClosedResourceError("stream was closed by us")
        if self._send_error is not None:
            raise self._send_error
        self._finish_sending()

    def _finish_sending(self) -> None:
        self._conn._core.send_stream_data(self.stream_id, b"", end_stream=True)
        self._eof_sent = True
        self._conn._kick()
        self._conn._maybe_forget(self)

    # -------------------------------------------------------------------- close
    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Graceful: FIN our side if still open; STOP_SENDING the peer if unread."""
        if not self._closed:
            if not self._eof_sent and self._send_error is None and self._conn._alive():
                self._finish_sending()
            if not self._recv_done() and self._conn._alive():
                self._conn._core.stop_stream(self.stream_id, StatusCode.CANCELLED)
            self._close_locally()
        await trio.lowlevel.checkpoint()

    def reset(self, error_code: int) -> None:
        """Abort both directions (RESET_STREAM + STOP_SENDING) with ``error_code``."""
        if not 0 <= error_code < 1 << 62:
            raise LocalProtocolError(f"invalid stream error code {error_code}")
        if self._closed:
            return
        if self._conn._alive():
            if not self._eof_sent and self._send_error is None:
                self._conn._core.reset_stream(self.stream_id, error_code)
            if not self._recv_done():
                self._conn._core.stop_stream(self.stream_id, error_code)
        self._close_locally()

    def _close_locally(self) -> None:
        self._closed = True
        self._drop_buffer()
        self._wake_all()
        self._notify_watcher()
        self._conn._forget(self)
        self._conn._kick()

    def _recv_done(self) -> bool:
        return self._recv_eof or self._recv_error is not None

    # ------------------------------------------------ fed by the connection
    def _on_data(self, data: bytes, end_stream: bool) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
        if end_stream:
            self._recv_eof = True
        self._recv_lot.unpark_all()
        if data:
            self._notify_watcher()

    def _on_reset(self, error_code: int) -> None:
        self._recv_error = StreamReset(self.stream_id, error_code)
        self._drop_buffer()
        self._recv_lot.unpark_all()
        self._notify_watcher()
        self._conn._maybe_forget(self)

    def _on_stop_sending(self, error_code: int) -> None:
        self._send_error = StreamReset(self.stream_id, error_code, direction="send")
        self._send_lot.unpark_all()
        self._conn._maybe_forget(self)

    def _on_connection_closed(self, exc: ConnectionClosed) -> None:
        if not self._recv_done():
            self._recv_error = exc
        if self._send_error is None:
            self._send_error = exc
        self._wake_all()
        if self._rx_pending():  # a clean EOF already read stays clean
            self._notify_watcher()

    def _drop_buffer(self) -> None:
        if self._buffered:
            self._conn._consumed(self, self._buffered)  # discarded counts as consumed
        self._chunks.clear()
        self._buffered = 0

    def _wake_all(self) -> None:
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()

    def _both_done(self) -> bool:
        recv_done = (self._recv_eof and not self._chunks) or self._recv_error is not None
        return recv_done and (self._eof_sent or self._send_error is not None)

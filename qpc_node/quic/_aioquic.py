"""aioquic 1.7.2 behind our :mod:`~qpc_node.quic.backend` protocols.

Stock aioquic lacks three things we need, so this module (and only this one)
reaches into its internals; ``tests/unit/test_tls_pin.py`` asserts every hook
below still exists with the expected signature and fails loudly on upgrade:

* **Client certificates.** The server never verifies them (and only asks for
  them in tests). We swap the connection's ``tls.Context`` for a subclass right
  after ``_initialize`` creates it, request a certificate from the ALPN callback
  when the negotiated ALPN needs one (``qpc-fed/1``), and run our policy in
  ``_server_handle_certificate{,_verify}``. The client side runs our pin/CA
  policy in ``_client_handle_certificate_verify`` (aioquic's own check is off).
* **Flow control by consumption.** aioquic doubles a receive window as soon as
  data *arrives*, so a slow reader would buffer without bound. We override
  ``_write_stream_limits``/``_write_connection_limits`` to extend windows only
  as the application consumes.
* **Send backlog / stream credit / peer certificate / handshake confirmed**
  are read from private attributes (no public API exists).
* **Packet building.** ``_write_stream_frame`` returns at once when the
  packet has no room for any frame of the stream (aioquic asks every stream
  with data each packet: quadratic with many live streams).
* **Stateless reset.** aioquic picks reset tokens with ``os.urandom`` and
  never recognises a reset it receives. We derive the tokens of our connection
  IDs from a static key (``__init__`` for the first, ``_replenish_connection_ids``
  for NEW_CONNECTION_ID), so a restarted node can reset its old connections;
  the endpoint recognises a reset by the peer's token (``_peer_cid``) and ends
  the connection through ``_close_end`` (RFC 9000 10.3.1: no closing period).
"""

from __future__ import annotations

import contextlib
import os
import ssl
from typing import cast

from aioquic import tls as atls
from aioquic._buffer import Buffer
from aioquic.buffer import size_uint_var
from aioquic.quic import events as aev
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    NetworkAddress,
    QuicConnection,
    QuicReceiveContext,
)
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    encode_quic_retry,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream as _AioquicStream
from cryptography.hazmat.primitives.serialization import Encoding

from qpc_node.errors import LocalProtocolError
from qpc_node.quic import events as ev
from qpc_node.quic.address import Address
from qpc_node.quic.admission import ResetTokens
from qpc_node.quic.backend import PacketHeader
from qpc_node.quic.settings import QuicSettings
from qpc_node.quic.tls import CertificateRejected, ClientTLS, RejectKind, ServerTLS

CID_LENGTH = 8


class AlertCertificateRequired(atls.Alert):
    description = atls.AlertDescription.certificate_required


class AlertUnknownCa(atls.Alert):
    description = atls.AlertDescription.unknown_ca


_ALERTS: dict[RejectKind, type[atls.Alert]] = {
    "bad_certificate": atls.AlertBadCertificate,
    "certificate_expired": atls.AlertCertificateExpired,
    "certificate_required": AlertCertificateRequired,
    "unknown_ca": AlertUnknownCa,
}


def _as_alert(exc: CertificateRejected) -> atls.Alert:
    return _ALERTS[exc.kind](str(exc))


class _QpcTlsContext(atls.Context):
    """aioquic's TLS 1.3 state machine plus our certificate policy hooks."""

    qpc_server: ServerTLS | None = None
    qpc_client: ClientTLS | None = None

    def qpc_peer_chain(self) -> list[bytes]:
        if self._peer_certificate is None:
            return []
        certs = [self._peer_certificate, *self._peer_certificate_chain]
        return [c.public_bytes(Encoding.DER) for c in certs]

    def _qpc_check_client(self) -> None:
        assert self.qpc_server is not None
        try:
            self.qpc_server.check_client_certificate(self.alpn_negotiated, self.qpc_peer_chain())
        except CertificateRejected as exc:
            raise _as_alert(exc) from exc

    def _server_handle_certificate(self, input_buf: Buffer) -> None:
        super()._server_handle_certificate(input_buf)
        if self._peer_certificate is None:  # empty Certificate: stock aioquic carries on
            self._qpc_check_client()

    def _server_handle_certificate_verify(self, input_buf: Buffer) -> None:
        super()._server_handle_certificate_verify(input_buf)  # signature: key possession
        self._qpc_check_client()

    def _client_handle_certificate_verify(self, input_buf: Buffer) -> None:
        super()._client_handle_certificate_verify(input_buf)  # signature: key possession
        assert self.qpc_client is not None
        try:
            self.qpc_client.check_server_certificate(self.qpc_peer_chain())
        except CertificateRejected as exc:
            raise _as_alert(exc) from exc


class _QpcQuicConnection(QuicConnection):
    """aioquic connection with our TLS policy and consumption-driven flow control."""

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        settings: QuicSettings,
        server_tls: ServerTLS | None = None,
        client_tls: ClientTLS | None = None,
        original_destination_connection_id: bytes | None = None,
        retry_source_connection_id: bytes | None = None,
        reset_tokens: ResetTokens | None = None,
    ) -> None:
        super().__init__(
            configuration=configuration,
            original_destination_connection_id=original_destination_connection_id,
            retry_source_connection_id=retry_source_connection_id,
        )
        self.qpc_reset_tokens = reset_tokens or ResetTokens.random()
        self._qpc_derive_reset_tokens()
        self.qpc_server_tls = server_tls
        self.qpc_client_tls = client_tls
        self.qpc_stream_window = settings.stream_receive_window
        self.qpc_connection_window = settings.connection_receive_window
        self.qpc_rx: dict[int, list[int]] = {}  # stream id -> [delivered, unread]
        self.qpc_unread_total = 0
        self.qpc_limits_due: set[int] = set()  # streams that may need MAX_STREAM_DATA
        self.qpc_sent: set[_AioquicStream] = set()  # streams that sent new bytes this call
        self._write_stream_limits = _skip_stream_limits  # type: ignore[method-assign]
        # Peer stream credit: ours to choose (aioquic hardcodes 128); no uni streams.
        for limit, value in ((self._local_max_streams_bidi, settings.max_streams_bidi),
                             (self._local_max_streams_uni, 0)):  # fmt: skip
            limit.value = limit.sent = value

    # -- TLS hooks
    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if type(self.tls) is not atls.Context:
            raise RuntimeError(f"aioquic changed its TLS context class: {type(self.tls)!r}")
        self.tls.__class__ = _QpcTlsContext
        tls_ctx = cast(_QpcTlsContext, self.tls)
        tls_ctx.qpc_server = self.qpc_server_tls
        tls_ctx.qpc_client = self.qpc_client_tls

    def _alpn_handler(self, alpn_protocol: str) -> None:
        super()._alpn_handler(alpn_protocol)
        server = self.qpc_server_tls
        if server is not None and server.requires_client_certificate(alpn_protocol):
            # Read by the server hello handler right after this callback returns.
            self.tls._request_client_certificate = True

    # -- reset streams: their send buffer is dead, free it now
    #
    # aioquic keeps a reset stream's send buffer (up to send_high_water bytes)
    # until the stream is discarded, which needs the peer to end its own side as
    # well: a peer that sends a request, never reads the answer and never
    # half-closes pins it until the connection ends. After a reset nothing in the
    # buffer is sent, re-sent (lost data is not rescheduled) or acknowledged.
    def reset_stream(self, stream_id: int, error_code: int) -> None:
        super().reset_stream(stream_id, error_code)
        self._qpc_free_reset_sender(stream_id)

    def _handle_stop_sending_frame(
        self, context: QuicReceiveContext, frame_type: int, buf: Buffer
    ) -> None:
        start = buf.tell()
        stream_id = buf.pull_uint_var()
        buf.seek(start)
        super()._handle_stop_sending_frame(context, frame_type, buf)
        self._qpc_free_reset_sender(stream_id)

    def _qpc_free_reset_sender(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.sender._reset_error_code is None:
            return  # not reset (it had finished already): its buffer drains as acked
        sender = stream.sender
        sender._buffer = bytearray()  # a fresh object: the old allocation is returned
        sender._buffer_start = sender._buffer_stop
        sender._pending = RangeSet()
        sender._acked = RangeSet()

    # -- stateless reset: tokens we hand out, and resets we receive
    def _qpc_derive_reset_tokens(self) -> None:
        for host_cid in self._host_cids:
            if host_cid.stateless_reset_token is not None:  # None: a client's first CID
                host_cid.stateless_reset_token = self.qpc_reset_tokens.token(host_cid.cid)

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        self._qpc_derive_reset_tokens()

    def _qpc_on_stateless_reset(self) -> None:
        """The peer has no state for us: end now, sending nothing (draining, 10.3.1)."""
        if self._close_event is None:
            self._close_event = aev.ConnectionTerminated(
                error_code=QuicErrorCode.NO_ERROR, frame_type=None, reason_phrase="stateless reset"
            )
        self._close_end()

    # -- flow control: grow windows as the reader consumes, not as data arrives
    #
    # aioquic offers MAX_STREAM_DATA from a loop over *every* live stream in
    # *every* packet it builds (~100 streams at 64 calls in flight: the largest
    # cost of building a packet). Only streams we listed in qpc_limits_due can
    # need one -- their reader consumed, or such a frame was lost -- so the
    # per-stream hook is a no-op and those streams are served from the
    # connection-limits hook, which aioquic calls just before that loop.
    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        limit = self._local_max_data
        target = limit.used - self.qpc_unread_total + self.qpc_connection_window
        if target - limit.value >= self.qpc_connection_window // 2:
            limit.value = target
        used = limit.used
        limit.used = 0  # disarms aioquic's grow-on-arrival doubling
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = used
        due = self.qpc_limits_due
        while due:
            sid = min(due)  # deterministic order; the set is small
            stream = self._streams.get(sid)
            if stream is not None:
                self._qpc_write_stream_limits(builder, space, stream)
            due.discard(sid)  # only once written: a full packet raises above

    def _qpc_write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: _AioquicStream
    ) -> None:
        rx = self.qpc_rx.get(cast(int, stream.stream_id))
        if rx is not None and stream.max_stream_data_local:
            target = rx[0] - rx[1] + self.qpc_stream_window
            if target - stream.max_stream_data_local >= self.qpc_stream_window // 2:
                stream.max_stream_data_local = target
        highest = stream.receiver.highest_offset
        stream.receiver.highest_offset = 0  # disarms aioquic's grow-on-arrival doubling
        try:
            QuicConnection._write_stream_limits(self, builder, space, stream)
        finally:
            stream.receiver.highest_offset = highest

    # -- packet building: a full packet is not offered to every stream with data
    #
    # aioquic offers each packet to every stream with unsent bytes; once the
    # packet is full each of them computes a frame header and gets nothing
    # (about 35 such calls per RPC at 64 in flight). Without room for the
    # smallest header of this stream's frames (type, id, length: max_size < 0
    # below in aioquic) the answer is known before asking, and asking changes
    # nothing then, so skipping it is exact.
    def _write_stream_frame(
        self,
        builder: QuicPacketBuilder,
        space: QuicPacketSpace,
        stream: _AioquicStream,
        max_offset: int,
    ) -> int:
        if builder.remaining_flight_space < 3 + size_uint_var(cast(int, stream.stream_id)):
            return 0
        used = super()._write_stream_frame(builder, space, stream, max_offset)
        if used > 0:  # aioquic moves such a stream to the end of its queue
            self.qpc_sent.add(stream)
        return used

    # -- packet building: only streams with something to write are walked
    #
    # aioquic's packet loop walks its whole stream queue -- every live stream --
    # once per packet it builds, and once more for the empty packet that ends
    # the loop. At 64 calls in flight that is ~100 streams, nearly all with
    # nothing to write (a caller waiting for its reply, a node waiting for the
    # caller's FIN), times ~5 packets per transmit. The loop acts on a stream
    # only if it is finished (discarded), owes STOP_SENDING or RESET_STREAM, or
    # has unsent bytes; every branch skips any other stream. So for one call
    # the queue holds just those (one cheap walk instead of ~5 full ones), and
    # afterwards the rest are put back in place: exactly aioquic's order (the
    # streams that sent new bytes go to the end, the others keep theirs).
    # Nothing else on aioquic's send path reads the stream map or the queue
    # (tests/unit/test_tls_pin.py checks its source).
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        queue = self._streams_queue
        busy = [
            s
            for s in queue
            if not s.sender.buffer_is_empty
            or s.sender.reset_pending
            or s.receiver.stop_pending
            or s.is_finished
        ]
        sent = self.qpc_sent
        if len(busy) == len(queue):
            try:
                return super().datagrams_to_send(now)
            finally:
                sent.clear()
        # The per-packet MAX_STREAM_DATA loop walks the stream map the same way;
        # its hook is a no-op (see _write_connection_limits), so for this call
        # the map holds the queued streams and the ones listed for a limit.
        streams = self._streams
        some = {cast(int, s.stream_id): s for s in busy}
        for sid in self.qpc_limits_due:
            if (stream := streams.get(sid)) is not None:
                some[sid] = stream
        self._streams, self._streams_queue = some, busy
        try:
            return super().datagrams_to_send(now)
        finally:
            after = self._streams_queue
            if sent or len(after) != len(busy):
                drop = set(busy).difference(after)  # discarded: gone from the map too
                for stream in drop:
                    del streams[cast(int, stream.stream_id)]
                drop |= sent
                queue = [s for s in queue if s not in drop]
                queue.extend(s for s in after if s in sent)
            self._streams, self._streams_queue = streams, queue
            sent.clear()

    def _on_max_stream_data_delivery(
        self, delivery: QuicDeliveryState, stream: _AioquicStream
    ) -> None:
        super()._on_max_stream_data_delivery(delivery, stream)
        if delivery != QuicDeliveryState.ACKED:  # lost: aioquic zeroed _sent, resend it
            self.qpc_limits_due.add(cast(int, stream.stream_id))


def _skip_stream_limits(
    builder: QuicPacketBuilder, space: QuicPacketSpace, stream: _AioquicStream
) -> None:
    """Stands in for aioquic's per-stream hook (see _write_connection_limits)."""


def _configuration(settings: QuicSettings, *, is_client: bool) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client,
        connection_id_length=CID_LENGTH,
        idle_timeout=settings.idle_timeout,
        max_data=settings.connection_receive_window,
        max_stream_data=settings.stream_receive_window,
        max_datagram_size=settings.max_datagram_size,
        verify_mode=ssl.CERT_NONE,  # our policy hooks verify; aioquic's check is off
    )


class AioquicCore:
    """:class:`~qpc_node.quic.backend.QuicCore` over one aioquic connection."""

    def __init__(self, quic: _QpcQuicConnection) -> None:
        self._q = quic
        self._confirmed_reported = False
        self._closing_reported = False

    @property
    def host_cid(self) -> bytes:
        return self._q.host_cid

    @property
    def is_client(self) -> bool:
        return self._q.configuration.is_client

    def connect(self, addr: Address, now: float) -> None:
        self._q.connect(addr, now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        self._q.receive_datagram(data, addr, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        return self._q.datagrams_to_send(now)

    def get_timer(self) -> float | None:
        return self._q.get_timer()

    def handle_timer(self, now: float) -> None:
        self._q.handle_timer(now)

    def next_event(self) -> ev.QuicEvent | None:
        q = self._q
        while (e := q.next_event()) is not None:
            out = self._translate(e)
            if out is not None:
                return out
        close = q._close_event  # set the moment a close is decided, either side
        if close is not None and not self._closing_reported:
            self._closing_reported = True
            return ev.ConnectionClosing(close.error_code, close.frame_type, close.reason_phrase)
        if not self._confirmed_reported and q._handshake_confirmed:
            self._confirmed_reported = True
            return ev.HandshakeConfirmed()
        return None

    def _translate(self, e: aev.QuicEvent) -> ev.QuicEvent | None:
        q = self._q
        if isinstance(e, aev.StreamDataReceived):
            if e.data:
                rx = q.qpc_rx.setdefault(e.stream_id, [0, 0])
                rx[0] += len(e.data)
                rx[1] += len(e.data)
                q.qpc_unread_total += len(e.data)
            return ev.StreamDataReceived(e.stream_id, e.data, e.end_stream)
        if isinstance(e, aev.StreamReset):
            return ev.StreamReset(e.stream_id, e.error_code)
        if isinstance(e, aev.StopSendingReceived):
            return ev.StopSendingReceived(e.stream_id, e.error_code)
        if isinstance(e, aev.HandshakeCompleted):
            return ev.HandshakeCompleted(e.alpn_protocol)
        if isinstance(e, aev.ConnectionIdIssued):
            return ev.ConnectionIdIssued(e.connection_id)
        if isinstance(e, aev.ConnectionIdRetired):
            return ev.ConnectionIdRetired(e.connection_id)
        if isinstance(e, aev.ConnectionTerminated):
            return ev.ConnectionTerminated(e.error_code, e.frame_type, e.reason_phrase)
        if isinstance(e, aev.PingAcknowledged):
            return ev.PingAcknowledged(e.uid)
        return None  # ProtocolNegotiated, DatagramFrameReceived: unused

    def can_open_stream(self) -> bool:
        q = self._q
        return q._local_next_stream_id_bidi // 4 < q._remote_max_streams_bidi

    def open_stream(self) -> int:
        sid = self._q.get_next_available_stream_id()
        self._q.send_stream_data(sid, b"")  # allocates the id now (two opens never share one)
        return sid

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        try:
            self._q.send_stream_data(stream_id, data, end_stream)
        except (ValueError, RuntimeError) as exc:  # finished / reset / FIN already sent
            raise LocalProtocolError(f"stream {stream_id}: {exc}") from exc

    def send_backlog(self, stream_id: int) -> int:
        stream = self._q._streams.get(stream_id)
        return 0 if stream is None else len(stream.sender._buffer)

    def stream_consumed(self, stream_id: int, nbytes: int) -> None:
        rx = self._q.qpc_rx.get(stream_id)
        if rx is not None:
            nbytes = min(nbytes, rx[1])
            rx[1] -= nbytes
            self._q.qpc_unread_total -= nbytes
            self._q.qpc_limits_due.add(stream_id)

    def stream_released(self, stream_id: int) -> None:
        rx = self._q.qpc_rx.pop(stream_id, None)
        self._q.qpc_limits_due.discard(stream_id)
        if rx is not None:
            self._q.qpc_unread_total -= rx[1]

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        with contextlib.suppress(ValueError):  # finished and discarded: nothing to abort
            self._q.reset_stream(stream_id, error_code)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        with contextlib.suppress(ValueError):  # finished and discarded: nothing to stop
            self._q.stop_stream(stream_id, error_code)

    def send_ping(self, uid: int) -> None:
        self._q.send_ping(uid)

    def close(self, error_code: int, reason: str) -> None:
        self._q.close(error_code=error_code, reason_phrase=reason)

    def peer_certificate_chain(self) -> list[bytes]:
        tls_ctx = getattr(self._q, "tls", None)  # absent until the first packet
        return tls_ctx.qpc_peer_chain() if isinstance(tls_ctx, _QpcTlsContext) else []

    @property
    def receive_buffered(self) -> int:
        return self._q.qpc_unread_total

    @property
    def peer_reset_token(self) -> bytes | None:
        return self._q._peer_cid.stateless_reset_token or None

    def stateless_reset_received(self) -> None:
        if self._q._state not in END_STATES:
            self._q._qpc_on_stateless_reset()


class AioquicBackend:
    name = "aioquic"

    def parse_header(self, data: bytes) -> PacketHeader | None:
        if data and not data[0] & 0x80:  # short header (1-RTT): the common case
            if not data[0] & 0x40 or len(data) < 1 + CID_LENGTH:  # fixed bit, DCID
                return None
            return PacketHeader(data[1 : 1 + CID_LENGTH], False, True)
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:  # includes aioquic.buffer.BufferReadError
            return None
        supported = header.version is None or header.version in _SUPPORTED_VERSIONS
        return PacketHeader(
            header.destination_cid,
            header.packet_type == QuicPacketType.INITIAL,
            supported,
            version=header.version,
            source_cid=header.source_cid,
            token=header.token,
        )

    def initial_decrypts(self, data: bytes) -> bool:
        """Does the datagram's first packet, a client Initial, decrypt (RFC 9001 5.2)?

        Initial keys come from the DCID, so anyone can make a valid one; but
        random bytes never pass the AEAD, and this costs no connection state.
        """
        buf = Buffer(data=data)
        try:
            header = pull_quic_header(buf, host_cid_length=CID_LENGTH)
            if header.packet_type != QuicPacketType.INITIAL or header.version is None:
                return False
            crypto = CryptoPair()
            crypto.setup_initial(header.destination_cid, is_client=False, version=header.version)
            crypto.decrypt_packet(data[: header.packet_length], buf.tell(), 0)
        except ValueError:  # truncated header, bad tag (aioquic CryptoError is one)
            return False
        return True

    def retry_packet(self, header: PacketHeader, retry_scid: bytes, token: bytes) -> bytes:
        assert header.version is not None
        return encode_quic_retry(
            version=header.version,
            source_cid=retry_scid,
            destination_cid=header.source_cid,
            original_destination_cid=header.destination_cid,
            retry_token=token,
        )

    def invalid_token_close(self, header: PacketHeader) -> bytes:
        """A server Initial with CONNECTION_CLOSE(INVALID_TOKEN) (RFC 9000 8.1.3)."""
        assert header.version is not None
        crypto = CryptoPair()
        crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
        builder = QuicPacketBuilder(
            host_cid=header.destination_cid,
            is_client=False,
            max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
            peer_cid=header.source_cid,
            version=header.version,
        )
        builder.start_packet(QuicPacketType.INITIAL, crypto)
        buf = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=16)
        buf.push_uint_var(QuicErrorCode.INVALID_TOKEN)
        buf.push_uint_var(QuicFrameType.PADDING)
        buf.push_uint_var(0)  # no reason phrase
        datagrams, _ = builder.flush()
        return datagrams[0]

    def new_cid(self) -> bytes:
        return os.urandom(CID_LENGTH)

    def create_client(
        self, tls: ClientTLS, settings: QuicSettings, *, reset_tokens: ResetTokens | None = None
    ) -> AioquicCore:
        config = _configuration(settings, is_client=True)
        config.alpn_protocols = [tls.alpn]
        config.server_name = tls.server_name
        if tls.credentials is not None:
            config.certificate = tls.credentials.certificate
            config.certificate_chain = tls.credentials.chain
            config.private_key = tls.credentials.private_key()
        return AioquicCore(
            _QpcQuicConnection(
                configuration=config, settings=settings, client_tls=tls, reset_tokens=reset_tokens
            )
        )

    def create_server(
        self,
        tls: ServerTLS,
        settings: QuicSettings,
        original_dcid: bytes,
        *,
        retry_source_cid: bytes | None = None,
        reset_tokens: ResetTokens | None = None,
    ) -> AioquicCore:
        config = _configuration(settings, is_client=False)
        config.alpn_protocols = list(tls.alpns)
        config.certificate = tls.credentials.certificate
        config.certificate_chain = tls.credentials.chain
        config.private_key = tls.credentials.private_key()
        return AioquicCore(
            _QpcQuicConnection(
                configuration=config,
                settings=settings,
                server_tls=tls,
                original_destination_connection_id=original_dcid,
                retry_source_connection_id=retry_source_cid,
                reset_tokens=reset_tokens,
            )
        )


_SUPPORTED_VERSIONS = frozenset(QuicConfiguration(is_client=True).supported_versions)

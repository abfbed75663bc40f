"""A reset stream's send buffer is freed at once (issue 11.1, aioquic internals).

aioquic keeps a reset stream's send buffer until the stream is discarded, which
needs the peer to end its own half too. A client that sends a request, never
reads the answer and never half-closes (or ignores our STOP_SENDING) pinned up
to ``send_high_water`` bytes per reset stream until the connection ended.
Sans-IO: two aioquic cores exchange datagrams in memory.
"""

from __future__ import annotations

import pytest

from qpc_node.quic import ALPN_CLIENT, ClientTLS, ServerTLS
from qpc_node.quic._aioquic import AioquicBackend, AioquicCore
from qpc_node.quic.settings import QuicSettings
from qpc_node.quic.testing import PkiFixture, make_test_pki

KIB = 1024


@pytest.fixture(scope="module")
def pki() -> PkiFixture:
    return make_test_pki()


class Pair:
    """A connected client and server core; ``pump`` delivers until quiet."""

    def __init__(self, pki: PkiFixture) -> None:
        # The client's window is smaller than the answer: the rest waits on the server.
        backend, settings = AioquicBackend(), QuicSettings(stream_receive_window=64 * KIB)
        self.now = 0.0
        self.client = backend.create_client(
            ClientTLS(ALPN_CLIENT, pin=pki.server.fingerprint), settings
        )
        self.client.connect(("10.0.0.2", 4201), self.now)
        first = self.client.datagrams_to_send(self.now)
        header = backend.parse_header(first[0][0])
        assert header is not None
        self.server: AioquicCore = backend.create_server(
            ServerTLS(pki.server), settings, header.destination_cid
        )
        for data, _ in first:
            self.server.receive_datagram(data, ("10.0.0.1", 5000), self.now)
        self.pump()

    def pump(self, rounds: int = 30) -> None:
        for _ in range(rounds):
            self.now += 0.01
            moved = False
            for data, _ in self.server.datagrams_to_send(self.now):
                self.client.receive_datagram(data, ("10.0.0.2", 4201), self.now)
                moved = True
            for data, _ in self.client.datagrams_to_send(self.now):
                self.server.receive_datagram(data, ("10.0.0.1", 5000), self.now)
                moved = True
            for core in (self.client, self.server):
                while core.next_event() is not None:
                    pass
            if not moved:
                return

    def unread_answer(self) -> int:
        """A call whose client never reads nor half-closes; the server's answer is
        queued beyond the client's flow-control window. Returns the stream id."""
        sid = self.client.open_stream()
        self.client.send_stream_data(sid, b"request")  # no FIN: the client's half stays open
        self.pump()
        self.server.send_stream_data(sid, b"x" * (256 * KIB))  # one send_high_water
        self.pump()
        assert self.server.send_backlog(sid) >= 128 * KIB  # held back by flow control
        return sid


def test_our_reset_frees_the_send_buffer(pki: PkiFixture) -> None:
    pair = Pair(pki)
    sid = pair.unread_answer()
    pair.server.reset_stream(sid, 0x10)
    assert pair.server.send_backlog(sid) == 0
    pair.pump()  # RESET_STREAM goes out and is acked; lost data is not re-sent
    assert pair.server.send_backlog(sid) == 0
    # The connection still works: a new call on it is answered.
    other = pair.client.open_stream()
    pair.client.send_stream_data(other, b"again", end_stream=True)
    pair.pump()
    pair.server.send_stream_data(other, b"answer", end_stream=True)
    pair.pump()
    assert pair.server.send_backlog(other) == 0


def test_stop_sending_frees_the_send_buffer(pki: PkiFixture) -> None:
    pair = Pair(pki)
    sid = pair.unread_answer()
    pair.client.stop_stream(sid, 0x11)  # aioquic answers with its own reset
    pair.pump()
    assert pair.server.send_backlog(sid) == 0


def test_the_aioquic_internals_this_relies_on() -> None:
    """After a reset aioquic neither sends nor re-sends nor acks buffered data."""
    import inspect

    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.stream import QuicStreamSender

    sender = QuicStreamSender(0, True)
    for attr in ("_buffer", "_buffer_start", "_buffer_stop", "_pending", "_acked"):
        assert hasattr(sender, attr), attr
    assert sender._reset_error_code is None
    delivery = inspect.getsource(QuicStreamSender.on_data_delivery)
    assert "if self._reset_error_code is not None:\n            return" in delivery
    assert "self.buffer_is_empty = True" in inspect.getsource(QuicStreamSender.reset)
    params = list(inspect.signature(QuicConnection._handle_stop_sending_frame).parameters)
    assert params == ["self", "context", "frame_type", "buf"]
    assert "stream.sender.reset(" in inspect.getsource(QuicConnection._handle_stop_sending_frame)

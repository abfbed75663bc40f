"""Packet building stays linear in the number of streams with data to send.

aioquic offers every packet to every stream with unsent bytes; once the packet
is full each of them still computed a frame header and got nothing, so a
transmit of P packets over S such streams cost about S x P calls (quadratic at
64 RPCs in flight). Our connection answers "no room" before asking. Sans-IO:
two aioquic cores exchange datagrams in memory; the data must arrive unchanged.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from aioquic.quic.connection import QuicConnection

from qpc_node.quic import ALPN_CLIENT, ClientTLS, ServerTLS, events
from qpc_node.quic._aioquic import AioquicBackend, AioquicCore
from qpc_node.quic.settings import QuicSettings
from qpc_node.quic.testing import PkiFixture, make_test_pki

STREAMS = 40
SIZE = 1100  # about one packet each: a transmit builds ~STREAMS packets


@pytest.fixture(scope="module")
def pki() -> PkiFixture:
    return make_test_pki()


def _connected(pki: PkiFixture) -> tuple[AioquicCore, AioquicCore]:
    backend, settings = AioquicBackend(), QuicSettings()
    client = backend.create_client(ClientTLS(ALPN_CLIENT, pin=pki.server.fingerprint), settings)
    client.connect(("10.0.0.2", 4201), 0.0)
    first = client.datagrams_to_send(0.0)
    header = backend.parse_header(first[0][0])
    assert header is not None
    server = backend.create_server(ServerTLS(pki.server), settings, header.destination_cid)
    for data, _ in first:
        server.receive_datagram(data, ("10.0.0.1", 5000), 0.0)
    now = 0.0
    for _ in range(10):
        now += 0.01
        for data, _ in server.datagrams_to_send(now):
            client.receive_datagram(data, ("10.0.0.2", 4201), now)
        for data, _ in client.datagrams_to_send(now):
            server.receive_datagram(data, ("10.0.0.1", 5000), now)
    for core in (client, server):
        while core.next_event() is not None:
            pass
    return client, server


def test_a_full_packet_is_not_offered_to_every_stream(
    pki: PkiFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, server = _connected(pki)
    payloads = {}
    for i in range(STREAMS):
        sid = client.open_stream()
        payloads[sid] = bytes([i]) * SIZE
        client.send_stream_data(sid, payloads[sid])

    asked = 0
    real = QuicConnection._write_stream_frame

    def counting(self: QuicConnection, *args: object, **kw: object) -> int:
        nonlocal asked
        asked += 1
        return real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(QuicConnection, "_write_stream_frame", counting)
    got: dict[int, bytearray] = defaultdict(bytearray)
    sent = 0
    now = 1.0
    for _ in range(200):  # congestion control and pacing spread it over transmits
        now += 0.005
        datagrams = client.datagrams_to_send(now)
        sent += len(datagrams)
        for data, _ in datagrams:
            server.receive_datagram(data, ("10.0.0.1", 5000), now)
        for data, _ in server.datagrams_to_send(now):  # ACKs open the window
            client.receive_datagram(data, ("10.0.0.2", 4201), now)
        while (e := server.next_event()) is not None:
            if isinstance(e, events.StreamDataReceived):
                got[e.stream_id] += e.data
        while client.next_event() is not None:
            pass
        if sum(map(len, got.values())) == STREAMS * SIZE:
            break
    monkeypatch.undo()

    assert {sid: bytes(b) for sid, b in got.items()} == payloads
    assert sent >= STREAMS * 3 // 4  # the data really spans many packets
    # Before: every packet asked each stream still holding data (~STREAMS x
    # packets / 2); now a stream is asked about once per frame it sends and
    # once per packet it does not fit in whole.
    assert asked <= 4 * STREAMS, (asked, sent)

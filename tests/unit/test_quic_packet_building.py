"""Packet building stays linear in the number of streams with data to send.

aioquic offers every packet to every stream with unsent bytes; once the packet
is full each of them still computed a frame header and got nothing, so a
transmit of P packets over S such streams cost about S x P calls (quadratic at
64 RPCs in flight). Our connection answers "no room" before asking. Sans-IO:
two aioquic cores exchange datagrams in memory; the data must arrive unchanged.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import pytest
from aioquic.quic.connection import QuicConnection

from qpc_node.errors import LocalProtocolError
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


def _exchange(client: AioquicCore, server: AioquicCore, now: float) -> None:
    for data, _ in client.datagrams_to_send(now):
        server.receive_datagram(data, ("10.0.0.1", 5000), now)
    for data, _ in server.datagrams_to_send(now):
        client.receive_datagram(data, ("10.0.0.2", 4201), now)
    for core in (client, server):
        while core.next_event() is not None:
            pass


IDLE = 100


def test_streams_with_nothing_to_write_are_not_walked_per_packet(
    pki: PkiFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: aioquic's packet loop walked all IDLE + 1 streams for every packet
    (and the empty one that ends it), twice (stream limits, then the send
    queue); now only the one with data."""
    client, server = _connected(pki)
    now = 1.0
    for _ in range(IDLE):  # requests sent and acknowledged: waiting for replies
        client.send_stream_data(client.open_stream(), b"q" * 100)
    for _ in range(5):
        now += 0.01
        _exchange(client, server, now)
    busy = client.open_stream()
    client.send_stream_data(busy, b"x" * 20_000)  # ~17 packets

    walked: list[int] = []
    real = QuicConnection._write_application

    def recording(self: QuicConnection, *args: object, **kw: object) -> None:
        walked.append(max(len(self._streams_queue), len(self._streams)))
        real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(QuicConnection, "_write_application", recording)
    got = bytearray()
    for _ in range(50):
        now += 0.005
        for data, _ in client.datagrams_to_send(now):
            server.receive_datagram(data, ("10.0.0.1", 5000), now)
        for data, _ in server.datagrams_to_send(now):
            client.receive_datagram(data, ("10.0.0.2", 4201), now)
        while (e := server.next_event()) is not None:
            if isinstance(e, events.StreamDataReceived) and e.stream_id == busy:
                got += e.data
        while client.next_event() is not None:
            pass
        if len(got) == 20_000:
            break
    monkeypatch.undo()
    assert bytes(got) == b"x" * 20_000
    assert walked and max(walked) <= 1, walked  # before: IDLE + 1 every time
    assert len(client._q._streams_queue) == len(client._q._streams) == IDLE + 1  # all back


def _scenario(pki: PkiFixture, steps: int = 60) -> list[tuple[object, ...]]:
    """A seeded mix of sends, FINs, resets and stop-sendings over 30 streams;
    returns, per transmit, the streams that got STREAM frames (in order), the
    queue order afterwards, and which streams aioquic has discarded."""
    import random

    rng = random.Random(7)
    client, server = _connected(pki)
    q = client._q
    log: list[tuple[object, ...]] = []
    wrote: list[int] = []
    real = QuicConnection._write_stream_frame

    def recording(self: QuicConnection, builder: object, space: object, stream, max_offset):  # type: ignore[no-untyped-def]
        used = real(self, builder, space, stream, max_offset)  # type: ignore[arg-type]
        if self is q and used:
            wrote.append(stream.stream_id)
        return used

    QuicConnection._write_stream_frame = recording  # type: ignore[method-assign]
    try:
        sids = [client.open_stream() for _ in range(30)]
        for sid in sids:
            client.send_stream_data(sid, b"o")
        now = 1.0
        _exchange(client, server, now)  # the server knows every stream
        open_sids = list(sids)
        for _ in range(steps):
            for sid in rng.sample(open_sids, k=min(len(open_sids), rng.randint(0, 6))):
                action = rng.random()
                if action < 0.7:
                    client.send_stream_data(sid, b"d" * rng.choice([10, 500, 1300, 4000]))
                elif action < 0.8:
                    client.send_stream_data(sid, b"f", end_stream=True)
                    with contextlib.suppress(LocalProtocolError):  # stopped: reset already
                        server.send_stream_data(sid, b"", end_stream=True)
                    open_sids.remove(sid)
                elif action < 0.9:
                    client.reset_stream(sid, 1)
                    open_sids.remove(sid)
                else:
                    client.stop_stream(sid, 2)
            now += 0.003
            wrote.clear()
            for data, _ in client.datagrams_to_send(now):
                server.receive_datagram(data, ("10.0.0.1", 5000), now)
            for data, _ in server.datagrams_to_send(now):
                client.receive_datagram(data, ("10.0.0.2", 4201), now)
            for core in (client, server):
                while core.next_event() is not None:
                    pass
            log.append(
                (
                    tuple(wrote),
                    tuple(s.stream_id for s in q._streams_queue),
                    tuple(sorted(q._streams)),
                )
            )
    finally:
        QuicConnection._write_stream_frame = real  # type: ignore[method-assign]
    return log


def test_frames_and_stream_order_are_aioquics_own(
    pki: PkiFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filtered walk writes the same frames, in the same order, and leaves
    the queue as aioquic's full walk does (same scenario, same clock).

    aioquic appends the streams that sent to its queue from a set, so their
    order follows the streams' hashes (object ids); hashing them by stream id
    makes both runs' sets iterate alike."""
    from aioquic.quic.stream import QuicStream as AioquicStream

    from qpc_node.quic._aioquic import _QpcQuicConnection

    monkeypatch.setattr(AioquicStream, "__hash__", lambda self: hash(self.stream_id))
    ours = _scenario(pki)
    monkeypatch.setattr(_QpcQuicConnection, "datagrams_to_send", QuicConnection.datagrams_to_send)
    stock = _scenario(pki)
    assert any(w for w, _, _ in stock) and len(stock[-1][2]) < 30  # it sent; some discarded
    assert ours == stock

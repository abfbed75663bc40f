"""Real endpoints on the seeded fake network under a virtual clock.

Loss, duplication, reordering, keepalive and dead-peer detection, flow control
with a slow reader, stream floods, admission caps -- all without sockets, and
in virtual time (minutes of retransmission take milliseconds).
"""

from __future__ import annotations

import hashlib

import pytest
import trio
import trio.testing

from qpc_node.quic import (
    ALPN_CLIENT,
    AdmissionLimits,
    ClientTLS,
    Connection,
    ConnectionClosed,
    HandshakeError,
    QuicSettings,
    QuicStream,
    ServerTLS,
    open_endpoint,
)
from qpc_node.quic.testing import (
    FakeNetwork,
    LinkProfile,
    PkiFixture,
    call,
    echo,
    make_test_pki,
    read_all,
    serving,
)

SERVER = ("10.0.0.1", 4201)


@pytest.fixture(scope="module")
def pki() -> PkiFixture:
    return make_test_pki()


def tls(pki: PkiFixture) -> ClientTLS:
    return ClientTLS(ALPN_CLIENT, pin=pki.server.fingerprint)


async def test_1000_exchanges_over_lossy_network(
    autojump_clock: trio.testing.MockClock, pki: PkiFixture
) -> None:
    profile = LinkProfile(drop=0.05, duplicate=0.03, reorder=0.1, delay=0.01, jitter=0.01)
    net = FakeNetwork(seed=20240601, profile=profile)
    with trio.fail_after(900):  # virtual seconds
        async with (
            open_endpoint(sock=net.bind(*SERVER), server_tls=ServerTLS(pki.server)) as server,
            serving(server, echo),
            open_endpoint(sock=net.bind("10.0.0.2")) as client,
        ):
            conn = await client.connect(*SERVER, tls(pki))
            results: dict[int, bytes] = {}

            async def worker(w: int) -> None:
                for i in range(100):
                    n = w * 100 + i
                    payload = b"%d:" % n + bytes([n % 251]) * (n * 7 % 4000)
                    results[n] = await call(conn, payload)
                    assert results[n] == b"echo:" + payload

            async with trio.open_nursery() as nursery:
                for w in range(10):
                    nursery.start_soon(worker, w)
            assert len(results) == 1000
    assert net.stats.dropped > 50 and net.stats.duplicated > 20 and net.stats.reordered > 50


async def test_dead_peer_noticed_within_timeout_and_idle_peer_kept_alive(
    autojump_clock: trio.testing.MockClock, pki: PkiFixture
) -> None:
    net = FakeNetwork(seed=7)
    settings = QuicSettings(dead_peer_timeout=8.0)
    async with (
        open_endpoint(
            sock=net.bind(*SERVER), server_tls=ServerTLS(pki.server), settings=settings
        ) as server,
        serving(server, echo),
        open_endpoint(sock=net.bind("10.0.0.2"), settings=settings) as client,
    ):
        conn = await client.connect(*SERVER, tls(pki))
        await trio.sleep(60)  # silent but alive: keepalives hold the connection open
        assert not conn.closed.is_set()
        assert conn.statistics().keepalives_sent >= 60 / settings.keepalive_seconds - 2
        assert await call(conn, b"still") == b"echo:still"
        (server_conn,) = server.connections()
        net.blackhole(SERVER)  # the server stops answering (and hearing)
        t0 = trio.current_time()
        with trio.fail_after(settings.dead_peer_timeout + 1):
            await conn.closed.wait()
        assert trio.current_time() - t0 <= settings.dead_peer_timeout + 0.1
        assert isinstance(conn.close_error, ConnectionClosed)
        assert "idle" in conn.close_error.reason.lower()
        with trio.fail_after(settings.dead_peer_timeout + 1):
            await server_conn.closed.wait()  # and the server forgets the client too
        with pytest.raises(ConnectionClosed):
            await conn.open_stream()


async def test_slow_reader_bounds_memory_through_flow_control(
    autojump_clock: trio.testing.MockClock, pki: PkiFixture
) -> None:
    net = FakeNetwork(seed=3)
    settings = QuicSettings(stream_receive_window=64 * 1024, send_high_water=32 * 1024)
    release = trio.Event()
    done = trio.Event()
    digests: list[str] = []

    async def slow_reader(conn: Connection, stream: QuicStream) -> None:
        await release.wait()
        digests.append(hashlib.sha256(await read_all(stream)).hexdigest())
        done.set()

    payload = bytes(range(256)) * 8192  # 2 MiB
    async with (
        open_endpoint(
            sock=net.bind(*SERVER), server_tls=ServerTLS(pki.server), settings=settings
        ) as server,
        serving(server, slow_reader),
        open_endpoint(sock=net.bind("10.0.0.2"), settings=settings) as client,
    ):
        conn = await client.connect(*SERVER, tls(pki))
        stream = await conn.open_stream()
        sent = trio.Event()

        async def upload() -> None:
            await stream.send_all(payload)
            await stream.send_eof()
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            await trio.sleep(30)
            (server_conn,) = server.connections()
            assert not sent.is_set()  # the writer is throttled, not buffered away
            assert 0 < server_conn.statistics().receive_buffered_bytes <= 64 * 1024
            assert conn.statistics().send_buffered_bytes <= 32 * 1024 + 1500
            release.set()
        with trio.fail_after(30):
            await done.wait()
        assert digests == [hashlib.sha256(payload).hexdigest()]
        assert server_conn.statistics().receive_buffered_bytes == 0


async def test_small_windows_keep_moving_over_a_lossy_network(
    autojump_clock: trio.testing.MockClock, pki: PkiFixture
) -> None:
    # 1 MiB through 16 KiB stream windows: ~128 MAX_STREAM_DATA updates, some of
    # them lost. A lost update must be re-sent, or the writer waits forever.
    profile = LinkProfile(drop=0.1, reorder=0.05, delay=0.005, jitter=0.002)
    net = FakeNetwork(seed=5, profile=profile)
    settings = QuicSettings(stream_receive_window=16 * 1024, connection_receive_window=32 * 1024)
    digests: list[str] = []

    async def reader(conn: Connection, stream: QuicStream) -> None:
        digests.append(hashlib.sha256(await read_all(stream)).hexdigest())

    payload = bytes(range(256)) * 4096  # 1 MiB
    with trio.fail_after(600):  # virtual seconds
        async with (
            open_endpoint(
                sock=net.bind(*SERVER), server_tls=ServerTLS(pki.server), settings=settings
            ) as server,
            serving(server, reader),
            open_endpoint(sock=net.bind("10.0.0.2"), settings=settings) as client,
        ):
            conn = await client.connect(*SERVER, tls(pki))
            stream = await conn.open_stream()
            await stream.send_all(payload)
            await stream.send_eof()
            while not digests:  # noqa: ASYNC110 -- the network, not a task, delivers it
                await trio.sleep(0.1)
    assert digests == [hashlib.sha256(payload).hexdigest()]
    assert net.stats.dropped > 20


async def test_stream_flood_is_limited_while_other_clients_are_served(
    autojump_clock: trio.testing.MockClock, pki: PkiFixture
) -> None:
    net = FakeNetwork(seed=11)
    limit = 32
    server_settings = QuicSettings(max_streams_bidi=limit, stream_receive_window=16 * 1024)

    async def handler(conn: Connection, stream: QuicStream) -> None:
        first = await stream.receive_some()
        if first.startswith(b"flood"):
            await trio.sleep_forever()  # holds its stream: no credit comes back
        rest = await read_all(stream)
        await stream.send_all(b"echo:" + first + rest)

    async with (
        open_endpoint(
            sock=net.bind(*SERVER), server_tls=ServerTLS(pki.server), settings=server_settings
        ) as server,
        serving(server, handler),
        open_endpoint(sock=net.bind("10.0.0.2")) as greedy,
        open_endpoint(sock=net.bind("10.0.0.3")) as polite,
    ):
        flood_conn = await greedy.connect(*SERVER, tls(pki))
        good_conn = await polite.connect(*SERVER, tls(pki))

        async def flood_one() -> None:
            stream = await flood_conn.open_stream()
            await stream.send_all(b"flood" + bytes(1000))
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            for _ in range(10_000):
                nursery.start_soon(flood_one)
            await trio.sleep(5)
            replies = [await call(good_conn, b"%d" % i) for i in range(50)]
            assert replies == [b"echo:%d" % i for i in range(50)]
            server_flood = next(
                c for c in server.connections() if c.remote_address[0] == "10.0.0.2"
            )
            stats = server_flood.statistics()
            assert stats.active_handlers <= limit and stats.open_streams <= limit
            assert stats.receive_buffered_bytes <= limit * 1005
            assert flood_conn.statistics().streams_waiting_for_credit == 10_000 - limit
            nursery.cancel_scope.cancel()


async def test_stream_limit_violation_closes_only_that_connection(
    autojump_clock: trio.testing.MockClock, pki: PkiFixture
) -> None:
    net = FakeNetwork(seed=12)
    async with (
        open_endpoint(
            sock=net.bind(*SERVER),
            server_tls=ServerTLS(pki.server),
            settings=QuicSettings(max_streams_bidi=16),
        ) as server,
        serving(server, echo),
        open_endpoint(sock=net.bind("10.0.0.2")) as rogue,
        open_endpoint(sock=net.bind("10.0.0.3")) as polite,
    ):
        rogue_conn = await rogue.connect(*SERVER, tls(pki))
        good_conn = await polite.connect(*SERVER, tls(pki))
        core = rogue_conn._core
        core._q._remote_max_streams_bidi = 10**6  # type: ignore[attr-defined]  # ignore MAX_STREAMS
        for _ in range(10_000):
            core.send_stream_data(core.open_stream(), b"x")
        rogue_conn._kick()
        with trio.fail_after(10):
            await rogue_conn.closed.wait()
        assert rogue_conn.close_error is not None
        assert rogue_conn.close_error.error_code == 0x4  # STREAM_LIMIT_ERROR
        assert await call(good_conn, b"fine") == b"echo:fine"


async def test_admission_caps_per_ip_and_overall(
    autojump_clock: trio.testing.MockClock, pki: PkiFixture
) -> None:
    net = FakeNetwork(seed=5)
    fast = QuicSettings(handshake_timeout=2)
    admission = AdmissionLimits(max_connections=3, max_connections_per_ip=2)
    async with (
        open_endpoint(
            sock=net.bind(*SERVER), server_tls=ServerTLS(pki.server), admission=admission
        ) as server,
        serving(server, echo),
        open_endpoint(sock=net.bind("10.0.0.2"), settings=fast) as a,
        open_endpoint(sock=net.bind("10.0.0.3"), settings=fast) as b,
        open_endpoint(sock=net.bind("10.0.0.4"), settings=fast) as c,
    ):
        kept = [await a.connect(*SERVER, tls(pki)) for _ in range(2)]
        with pytest.raises(HandshakeError):
            await a.connect(*SERVER, tls(pki))  # third from the same IP
        kept.append(await b.connect(*SERVER, tls(pki)))
        with pytest.raises(HandshakeError):
            await c.connect(*SERVER, tls(pki))  # over the overall cap
        assert server.statistics().refused_admission >= 2
        assert server.statistics().server_connections == 3
        await kept[0].aclose()
        await trio.sleep(5)  # closing period over: the slot is free again
        assert await call(await c.connect(*SERVER, tls(pki)), b"in") == b"echo:in"

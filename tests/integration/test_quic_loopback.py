"""Real QUIC over real loopback UDP: echo, dual stack, resets, garbage, shutdown."""

from __future__ import annotations

import os
import random
import socket

import pytest
import trio

from qpc_node.errors import StatusCode
from qpc_node.quic import (
    ALPN_CLIENT,
    ClientTLS,
    Connection,
    ConnectionClosed,
    HandshakeError,
    QuicSettings,
    QuicStream,
    ServerTLS,
    StreamReset,
    open_endpoint,
)
from qpc_node.quic.testing import PkiFixture, call, echo, make_test_pki, read_all, serving


@pytest.fixture(scope="module")
def pki() -> PkiFixture:
    return make_test_pki()


def client_tls(pki: PkiFixture) -> ClientTLS:
    return ClientTLS(ALPN_CLIENT, pin=pki.server.fingerprint)


async def test_1000_echo_exchanges_over_loopback(pki: PkiFixture) -> None:
    with trio.fail_after(30):
        async with (
            open_endpoint("127.0.0.1", 0, server_tls=ServerTLS(pki.server)) as server,
            serving(server, echo),
            open_endpoint("127.0.0.1", 0) as client,
        ):
            conn = await client.connect(*server.local_address, client_tls(pki))
            assert conn.peer_identity is not None
            assert conn.peer_identity.cert_fingerprint == pki.server.fingerprint
            results: dict[int, bytes] = {}

            async def worker(w: int) -> None:
                for i in range(100):
                    n = w * 100 + i
                    results[n] = await call(conn, b"%d:" % n + os.urandom(n % 3000))

            async with trio.open_nursery() as nursery:
                for w in range(10):
                    nursery.start_soon(worker, w)
            assert len(results) == 1000
            assert all(r.startswith(b"echo:%d:" % n) for n, r in results.items())
            stats = conn.statistics()
            assert stats.open_streams == 0 and stats.receive_buffered_bytes == 0
            await conn.aclose()


@pytest.mark.parametrize(
    ("server_host", "client_host", "target"),
    [("::", "127.0.0.1", "127.0.0.1"), ("::", "::1", "::1"), ("::1", "::", "::1")],
)
async def test_dual_stack_and_ipv6(
    pki: PkiFixture, server_host: str, client_host: str, target: str
) -> None:
    with trio.fail_after(10):
        async with (
            open_endpoint(server_host, 0, server_tls=ServerTLS(pki.server)) as server,
            serving(server, echo),
        ):
            port = server.local_address[1]
            async with open_endpoint(client_host, 0) as client:
                conn = await client.connect(target, port, client_tls(pki))
                assert await call(conn, b"hi") == b"echo:hi"
                seen = {c.remote_address[0] for c in server.connections()}
                assert seen == {"127.0.0.1" if target == "127.0.0.1" else "::1"}


async def test_handler_error_resets_only_that_stream(pki: PkiFixture) -> None:
    async def handler(conn: Connection, stream: QuicStream) -> None:
        data = await read_all(stream)
        if data == b"boom":
            raise ValueError("handler bug")
        await echo_reply(stream, data)

    async def echo_reply(stream: QuicStream, data: bytes) -> None:
        await stream.send_all(b"echo:" + data)

    with trio.fail_after(10):
        async with (
            open_endpoint("127.0.0.1", 0, server_tls=ServerTLS(pki.server)) as server,
            serving(server, handler),
            open_endpoint("127.0.0.1", 0) as client,
        ):
            conn = await client.connect(*server.local_address, client_tls(pki))
            with pytest.raises(StreamReset) as info:
                await call(conn, b"boom")
            assert info.value.error_code == StatusCode.INTERNAL
            assert await call(conn, b"ok") == b"echo:ok"
            (sconn,) = server.connections()
            assert sconn.statistics().handler_errors == 1


async def test_reset_mid_transfer_gives_typed_error_both_ways(pki: PkiFixture) -> None:
    server_saw: list[BaseException] = []
    got_some = trio.Event()

    async def handler(conn: Connection, stream: QuicStream) -> None:
        first = await stream.receive_some()
        if first.startswith(b"upload"):
            got_some.set()
            try:
                await read_all(stream)
            except StreamReset as exc:
                server_saw.append(exc)
            return
        await stream.send_all(b"x" * 100_000)  # then abort the download
        stream.reset(77)

    with trio.fail_after(10):
        async with (
            open_endpoint("127.0.0.1", 0, server_tls=ServerTLS(pki.server)) as server,
            serving(server, handler),
            open_endpoint("127.0.0.1", 0) as client,
        ):
            conn = await client.connect(*server.local_address, client_tls(pki))
            up = await conn.open_stream()
            await up.send_all(b"upload" + b"y" * 10_000)
            await got_some.wait()
            up.reset(42)
            with pytest.raises(trio.ClosedResourceError):
                await up.send_all(b"more")
            down = await conn.open_stream()
            await down.send_all(b"download")
            with pytest.raises(StreamReset) as info:
                await read_all(down)
            assert info.value.error_code == 77
            for _ in range(100):
                if server_saw:
                    break
                await trio.sleep(0.01)
            assert isinstance(server_saw[0], StreamReset)
            assert server_saw[0].error_code == 42
            assert await call_ok(conn)


async def call_ok(conn: Connection) -> bool:
    stream = await conn.open_stream()
    await stream.send_all(b"upload-then-eof")
    await stream.send_eof()
    await stream.aclose()
    return True


def _long_header(version: int, size: int, rng: random.Random) -> bytes:
    """A well-formed long-header Initial (RFC 9000 17.2.2) of ``size`` bytes, junk inside."""
    head = (
        b"\xc0"
        + version.to_bytes(4, "big")
        + b"\x08"
        + rng.randbytes(8)  # a fresh destination CID: no two of them reach one connection
        + b"\x08"
        + rng.randbytes(8)
        + b"\x00"  # no token
    )
    rest = size - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + rng.randbytes(rest)


def _junk(rng: random.Random) -> dict[str, list[bytes]]:
    """1,000 datagrams, by what the endpoint must do with them."""
    return {
        # No fixed bit, or too short for a destination CID, or a truncated long header.
        "unparseable": [
            bytes([rng.randrange(0x40)]) + rng.randbytes(rng.randrange(1400)) for _ in range(300)
        ]
        + [b"\x40" + rng.randbytes(rng.randrange(8)) for _ in range(50)]
        + [b"\xc0\x00\x00\x00\x01" for _ in range(50)],
        # Parse, but name no connection and cannot open one: 1-RTT packets for unknown
        # CIDs, Initials under 1,200 bytes, Initials of a version we don't speak.
        "unknown_cid": [
            bytes([0x40 | rng.randrange(0x40)]) + rng.randbytes(8 + rng.randrange(1300))
            for _ in range(300)
        ]
        + [_long_header(1, rng.randrange(60, 1200), rng) for _ in range(150)]
        + [_long_header(0x1A2A3A4A, 1250, rng) for _ in range(130)],
        # Full-size Initials of version 1 with random payloads: their Initial keys (from
        # the DCID) don't open them, so they are dropped before any state or reply
        # (issue 11: garbage never becomes a half-open connection).
        "undecryptable_initial": [
            _long_header(1, 1200 + rng.randrange(200), rng) for _ in range(20)
        ],
    }


async def test_garbage_datagrams_are_dropped_and_server_keeps_serving(pki: PkiFixture) -> None:
    rng = random.Random(1000)
    junk = _junk(rng)
    datagrams = [d for kind in junk.values() for d in kind]
    rng.shuffle(datagrams)
    assert len(datagrams) == 1000
    with trio.fail_after(20):
        async with (
            open_endpoint("127.0.0.1", 0, server_tls=ServerTLS(pki.server)) as server,
            serving(server, echo),
        ):
            raw = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with raw:
                # 100 at a time (< 150 KB), each batch counted before the next is sent:
                # the receive buffer (2 MiB) never overflows, so every datagram arrives.
                for start in range(0, len(datagrams), 100):
                    for d in datagrams[start : start + 100]:
                        await raw.sendto(d, server.local_address)
                    # The counter is fed from the endpoint's receive loop; poll it (bounded).
                    while server.statistics().rx_datagrams < start + 100:  # noqa: ASYNC110
                        await trio.sleep(0.001)
            stats = server.statistics()
            admitted = (
                stats.server_connections
                + stats.handshakes_failed_server
                + stats.handshakes_ok_server
            )
            counted = {
                "unparseable": stats.dropped_unparseable,
                "unknown_cid": stats.dropped_unknown_cid,
                "undecryptable_initial": stats.dropped_undecryptable,
            }
            assert stats.rx_datagrams == 1000
            assert counted == {kind: len(ds) for kind, ds in junk.items()}
            assert admitted == 0 and stats.half_open_connections == 0
            assert stats.refused_admission == 0
            async with open_endpoint("127.0.0.1", 0) as client:
                conn = await client.connect(*server.local_address, client_tls(pki))
                assert await call(conn, b"still here") == b"echo:still here"
            assert server.statistics().connection_failures == 0


async def test_graceful_close_lets_inflight_calls_finish(pki: PkiFixture) -> None:
    started = trio.Event()

    async def slow(conn: Connection, stream: QuicStream) -> None:
        data = await read_all(stream)
        started.set()
        await trio.sleep(0.2)
        await stream.send_all(b"done:" + data)

    with trio.fail_after(10):
        fast_fail = QuicSettings(handshake_timeout=0.3)
        async with open_endpoint("127.0.0.1", 0, settings=fast_fail) as client:
            async with (
                open_endpoint("127.0.0.1", 0, server_tls=ServerTLS(pki.server)) as server,
                serving(server, slow),
            ):
                conn = await client.connect(*server.local_address, client_tls(pki))
                replies: list[bytes] = []

                async def inflight() -> None:
                    replies.append(await call(conn, b"work"))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(inflight)
                    await started.wait()
                    await server.close(grace=5)
                assert replies == [b"done:work"]
            with trio.fail_after(2):
                await conn.closed.wait()
            assert isinstance(conn.close_error, ConnectionClosed)
            with pytest.raises(ConnectionClosed):
                await conn.open_stream()
            with pytest.raises(HandshakeError):  # nobody listens there any more
                await client.connect(*server.local_address, client_tls(pki))

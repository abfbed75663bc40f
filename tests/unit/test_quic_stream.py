"""QuicStream against Trio's own HalfCloseableStream conformance suite, plus our extras."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from qpc_node.quic import (
    ALPN_CLIENT,
    ClientTLS,
    Connection,
    QuicSettings,
    QuicStream,
    ServerTLS,
    StreamReset,
    open_endpoint,
)
from qpc_node.quic.testing import FakeNetwork, LinkProfile, PkiFixture, make_test_pki, serving


@pytest.fixture(scope="module")
def pki() -> PkiFixture:
    return make_test_pki()


@contextlib.asynccontextmanager
async def stream_factory(
    pki: PkiFixture, settings: QuicSettings | None = None
) -> AsyncIterator[object]:
    """Yields an async maker of connected (client stream, server stream) pairs."""
    net = FakeNetwork(seed=1, profile=LinkProfile(delay=0.0005, jitter=0.0))
    handed: trio.MemorySendChannel[QuicStream]
    handed, received = trio.open_memory_channel[QuicStream](0)

    async def handler(conn: Connection, stream: QuicStream) -> None:
        assert await stream.receive_some(1) == b"!"  # the byte that made it visible
        await handed.send(stream)
        await trio.sleep_forever()  # the test owns the stream from here

    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            open_endpoint(
                sock=net.bind("10.0.0.1", 4201), server_tls=ServerTLS(pki.server), settings=settings
            )
        )
        await stack.enter_async_context(serving(server, handler))
        client = await stack.enter_async_context(
            open_endpoint(sock=net.bind("10.0.0.2"), settings=settings)
        )
        conn = await client.connect(
            "10.0.0.1", 4201, ClientTLS(ALPN_CLIENT, pin=pki.server.fingerprint)
        )

        async def make_pair() -> tuple[QuicStream, QuicStream]:
            mine = await conn.open_stream()
            await mine.send_all(b"!")
            theirs = await received.receive()
            return mine, theirs

        yield make_pair


async def test_trio_half_closeable_stream_conformance(pki: PkiFixture) -> None:
    with trio.fail_after(30):
        async with stream_factory(pki) as make_pair:
            await trio.testing.check_half_closeable_stream(make_pair, None)  # type: ignore[arg-type]


async def test_cancelled_receive_keeps_stream_usable(pki: PkiFixture) -> None:
    with trio.fail_after(10):
        async with stream_factory(pki) as make_pair:
            mine, theirs = await make_pair()  # type: ignore[operator]
            with trio.move_on_after(0.05):
                await theirs.receive_some()
            await mine.send_all(b"after")
            assert await theirs.receive_some() == b"after"
            with pytest.raises(ValueError):
                await theirs.receive_some(0)


async def test_watch_receive_reports_data_reset_and_not_a_clean_eof(pki: PkiFixture) -> None:
    with trio.fail_after(10):
        async with stream_factory(pki) as make_pair:
            # A clean end of stream is not news; data after it is.
            mine, theirs = await make_pair()  # type: ignore[operator]
            fired: list[str] = []
            theirs.watch_receive(lambda: fired.append("data"))
            await mine.send_eof()
            assert await theirs.receive_some() == b""
            assert fired == []

            mine, theirs = await make_pair()  # type: ignore[operator]
            seen = trio.Event()
            theirs.watch_receive(seen.set)
            await mine.send_all(b"late")
            await seen.wait()
            assert await theirs.receive_some() == b"late"  # left for the reader

            # A reset fires it; so does an already pending one, at once.
            mine, theirs = await make_pair()  # type: ignore[operator]
            seen = trio.Event()
            theirs.watch_receive(seen.set)
            mine.reset(9)
            await seen.wait()
            again: list[int] = []
            theirs.watch_receive(lambda: again.append(1))
            assert again == [1]
            with pytest.raises(StreamReset) as info:
                await theirs.receive_some()
            assert info.value.error_code == 9

            # unwatch: later data is not reported.
            mine, theirs = await make_pair()  # type: ignore[operator]
            stale: list[int] = []
            unwatch = theirs.watch_receive(lambda: stale.append(1))
            unwatch()
            await mine.send_all(b"x")
            assert await theirs.receive_some() == b"x"
            assert stale == []


async def _buffered(stream: QuicStream) -> None:
    """Until the stream holds something for its reader (without taking it)."""
    seen = trio.Event()
    stream.watch_receive(seen.set)
    await seen.wait()


async def test_receive_nowait_takes_what_is_here_and_never_waits(pki: PkiFixture) -> None:
    with trio.fail_after(10):
        async with stream_factory(pki) as make_pair:
            mine, theirs = await make_pair()  # type: ignore[operator]
            assert theirs.receive_nowait() is None  # nothing yet: would wait
            await mine.send_all(b"hello")
            await _buffered(theirs)
            assert theirs.receive_nowait(3) == b"hel"
            assert theirs.receive_nowait() == b"lo"
            assert theirs.receive_nowait() is None
            await mine.send_eof()
            got = None
            for _ in range(5000):  # bounded poll: a clean EOF fires no watcher
                if (got := theirs.receive_nowait()) is not None:
                    break
                await trio.sleep(0.001)
            assert got == b""  # clean end of stream, as receive_some says it

            mine, theirs = await make_pair()  # type: ignore[operator]
            mine.reset(7)
            await _buffered(theirs)
            with pytest.raises(StreamReset):
                theirs.receive_nowait()


async def test_try_send_final_sends_only_what_fits_without_waiting(pki: PkiFixture) -> None:
    settings = QuicSettings(send_high_water=4096)
    with trio.fail_after(10):
        async with stream_factory(pki, settings) as make_pair:
            mine, theirs = await make_pair()  # type: ignore[operator]
            assert not theirs.try_send_final(b"x" * 5000)  # over the room: nothing sent
            assert not theirs.closed
            assert theirs.try_send_final(b"y" * 4000)
            assert theirs.closed
            got = b""
            while data := await mine.receive_some():
                got += data
            assert got == b"y" * 4000  # and then the FIN
            with pytest.raises(trio.ClosedResourceError):
                theirs.try_send_final(b"z")

"""UDP GSO/GRO on real loopback: runs coalesce into one send (and one read), and
the fallbacks hold."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from qpc_node.quic import ALPN_CLIENT, ClientTLS, Connection, QuicStream, ServerTLS, open_endpoint
from qpc_node.quic.address import Address
from qpc_node.quic.testing import make_test_pki, serving
from qpc_node.quic.transport import GSO_MAX_SEGMENTS, UdpSocket, gso_supported
from tests.ci_needs import unavailable


def _linux_gso() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return gso_supported(s)


@pytest.fixture
def gso_kernel() -> None:
    if not _linux_gso():
        unavailable("the GSO tests", "no UDP_SEGMENT on this kernel")


needs_gso = pytest.mark.usefixtures("gso_kernel")


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def receive(sock: UdpSocket, count: int) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        got += [d for d, _ in sock.recv_batch(count)]
        time.sleep(0.001)
    return got


def burst(addr: Address) -> list[tuple[bytes, Address]]:
    """A run longer than one GSO call, a short tail, then a lone full-size one."""
    full = [(bytes([k]) * 1200, addr) for k in range(GSO_MAX_SEGMENTS + 6)]
    return [*full, (b"t" * 300, addr), (b"z" * 1200, addr)]


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[UdpSocket, UdpSocket, Address]]:
    bind_host, target, gso = request.param
    if ":" in target and not _ipv6():
        unavailable("the GSO tests", "no IPv6 loopback (.ci/run enables it on lo)")
    tx = UdpSocket.bind(bind_host, 0, gso=gso)
    rx = UdpSocket.bind(bind_host, 0)
    port = rx.local_address[1]
    addr: Address = (target, port, 0, 0) if ":" in target else (target, port)
    yield tx, rx, addr
    tx.close()
    rx.close()


@needs_gso
@pytest.mark.parametrize(
    "pair",
    [("127.0.0.1", "127.0.0.1", True), ("::", "127.0.0.1", True), ("::1", "::1", True)],
    indirect=True,
    ids=["ipv4", "v4-mapped", "ipv6"],
)
def test_runs_coalesce_and_arrive_as_the_same_datagrams(
    pair: tuple[UdpSocket, UdpSocket, Address],
) -> None:
    tx, rx, addr = pair
    dgrams = burst(addr)
    assert tx.gso
    assert tx.send_batch(dgrams) == len(dgrams)
    assert receive(rx, len(dgrams)) == [d for d, _ in dgrams]
    assert tx.stats.tx_datagrams == len(dgrams)
    # 64 full; 6 full + the short tail; the lone one.
    assert (tx.stats.tx_calls, tx.stats.tx_gso_batches) == (3, 2)
    # Loopback hands a GSO send to a GRO socket unsplit; recv_batch cuts it.
    assert rx.gro
    assert (rx.stats.rx_calls, rx.stats.rx_datagrams) == (3, len(dgrams))


@pytest.mark.parametrize("pair", [("::", "127.0.0.1", False)], indirect=True)
def test_gso_forced_off_sends_one_datagram_per_call(
    pair: tuple[UdpSocket, UdpSocket, Address],
) -> None:
    tx, rx, addr = pair
    dgrams = burst(addr)
    assert not tx.gso and not tx.gro
    assert tx.send_batch(dgrams) == len(dgrams)
    assert receive(rx, len(dgrams)) == [d for d, _ in dgrams]
    assert tx.stats.tx_calls == tx.stats.tx_datagrams == len(dgrams)
    assert tx.stats.tx_gso_batches == 0
    assert rx.stats.rx_calls == rx.stats.rx_datagrams == len(dgrams)
    # ... and a socket without GRO reads a GSO send as separate datagrams.
    assert rx.send_batch([(d, tx.local_address) for d, _ in dgrams]) == len(dgrams)
    assert rx.stats.tx_gso_batches == 2
    assert receive(tx, len(dgrams)) == [d for d, _ in dgrams]
    assert tx.stats.rx_calls == tx.stats.rx_datagrams == len(dgrams)


class _ScriptedSocket(socket.socket):
    """A real UDP socket whose GSO sends fail with a chosen error."""

    sendmsg_error: OSError | None = None
    sendmsg_calls = 0

    def sendmsg(self, *args: Any) -> int:  # type: ignore[override]
        self.sendmsg_calls += 1
        if self.sendmsg_error is not None:
            raise self.sendmsg_error
        return super().sendmsg(*args)


def _scripted(error: OSError) -> tuple[UdpSocket, _ScriptedSocket]:
    raw = _ScriptedSocket(socket.AF_INET, socket.SOCK_DGRAM)
    raw.bind(("127.0.0.1", 0))
    raw.sendmsg_error = error
    return UdpSocket(raw), raw


@needs_gso
@pytest.mark.parametrize("code", [errno.EIO, errno.EINVAL, errno.ENOPROTOOPT])
def test_refused_gso_resends_the_run_singly_and_stays_off(code: int) -> None:
    tx, raw = _scripted(OSError(code, os.strerror(code)))
    rx = UdpSocket.bind("127.0.0.1", 0)
    try:
        dgrams = burst(rx.local_address)
        assert tx.gso
        assert tx.send_batch(dgrams) == len(dgrams)
        assert not tx.gso
        assert raw.sendmsg_calls == 1
        assert receive(rx, len(dgrams)) == [d for d, _ in dgrams]
        assert tx.stats.tx_calls == tx.stats.tx_datagrams == len(dgrams)
        assert tx.send_batch(dgrams) == len(dgrams)
        assert raw.sendmsg_calls == 1  # never tried again
    finally:
        tx.close()
        rx.close()


@needs_gso
def test_would_block_keeps_the_whole_run_for_later() -> None:
    tx, raw = _scripted(BlockingIOError(errno.EAGAIN, "full"))
    rx = UdpSocket.bind("127.0.0.1", 0)
    try:
        lone = (b"a" * 100, rx.local_address)
        dgrams = [lone, *burst(rx.local_address)]
        assert tx.send_batch(dgrams) == 1  # the lone one went by sendto
        assert tx.gso and tx.stats.tx_would_block == 1
        raw.sendmsg_error = None
        assert tx.send_batch(dgrams[1:]) == len(dgrams) - 1
        assert receive(rx, len(dgrams)) == [d for d, _ in dgrams]
        assert tx.stats.tx_errors == 0
    finally:
        tx.close()
        rx.close()


async def _echo(conn: Connection, stream: QuicStream) -> None:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    await stream.send_all(bytes(data))
    await stream.send_eof()


@needs_gso
@pytest.mark.parametrize("gso", [True, False])
async def test_endpoint_bulk_transfer_coalesces_sends(gso: bool) -> None:
    pki = make_test_pki()
    server_sock = UdpSocket.bind("127.0.0.1", 0, gso=gso)
    payload = os.urandom(1 << 20)
    with trio.fail_after(30):
        async with (
            open_endpoint(sock=server_sock, server_tls=ServerTLS(pki.server)) as server,
            serving(server, _echo),
            open_endpoint("127.0.0.1", 0) as client,
        ):
            tls = ClientTLS(ALPN_CLIENT, pin=pki.server.fingerprint)
            conn = await client.connect(*server.local_address, tls)
            stream = await conn.open_stream()
            await stream.send_all(payload)
            await stream.send_eof()
            reply = bytearray()
            while chunk := await stream.receive_some():
                reply += chunk
            assert reply == payload
            await conn.aclose()
    stats = server_sock.stats
    assert stats.tx_datagrams > 500
    if gso:
        assert stats.tx_calls * 4 < stats.tx_datagrams, stats
    else:
        assert stats.tx_calls == stats.tx_datagrams

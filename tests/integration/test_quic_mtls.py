"""mTLS / ALPN / pinning matrix over real loopback QUIC, one case per test.

aioquic's server never verifies client certificates on its own; these negative
cases are what proves our hooks in ``qpc_node.quic._aioquic`` still bite.
"""

from __future__ import annotations

import pytest
import trio

from qpc_node.quic import (
    ALPN_CLIENT,
    ALPN_FEDERATION,
    ClientTLS,
    Connection,
    HandshakeError,
    NodeCredentials,
    PeerIdentity,
    QuicSettings,
    QuicStream,
    ServerTLS,
    load_or_create_node_credentials,
    open_endpoint,
)
from qpc_node.quic.testing import PkiFixture, make_test_pki, serving

CRYPTO_ERROR = 0x100  # + TLS alert (RFC 9001 4.8)
BAD_CERTIFICATE = CRYPTO_ERROR + 42
CERTIFICATE_EXPIRED = CRYPTO_ERROR + 45
UNKNOWN_CA = CRYPTO_ERROR + 48
CERTIFICATE_REQUIRED = CRYPTO_ERROR + 116
NO_APPLICATION_PROTOCOL = CRYPTO_ERROR + 120

FAST = QuicSettings(handshake_timeout=3)


@pytest.fixture(scope="module")
def pki() -> PkiFixture:
    return make_test_pki()


async def handshake(
    server_tls: ServerTLS, client_tls: ClientTLS
) -> tuple[str, PeerIdentity | None]:
    """Connect, make one call; return the reply and what the server handler saw."""
    seen: list[PeerIdentity | None] = []

    async def handler(conn: Connection, stream: QuicStream) -> None:
        seen.append(conn.peer_identity)
        await stream.send_all(conn.alpn.encode())

    with trio.fail_after(10):
        async with (
            open_endpoint("127.0.0.1", 0, server_tls=server_tls, settings=FAST) as server,
            serving(server, handler),
            open_endpoint("127.0.0.1", 0, settings=FAST) as client,
        ):
            conn = await client.connect(*server.local_address, client_tls)
            stream = await conn.open_stream()
            await stream.send_eof()
            reply = await stream.receive_some()
            await conn.aclose()
    return reply.decode(), seen[0]


async def refused(server_tls: ServerTLS, client_tls: ClientTLS) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        await handshake(server_tls, client_tls)
    return info.value


def fed_server(pki: PkiFixture, **kw: object) -> ServerTLS:
    return ServerTLS(pki.server, federation_ca=pki.ca.certificate_pem, **kw)  # type: ignore[arg-type]


def fed_client(pki: PkiFixture, creds: NodeCredentials | None) -> ClientTLS:
    return ClientTLS(ALPN_FEDERATION, pin=pki.server.fingerprint, credentials=creds)


@pytest.mark.parametrize("key_type", ["ed25519", "p256"])
async def test_ca_signed_client_cert_accepted_and_identity_visible(key_type: str) -> None:
    pki = make_test_pki(key_type=key_type)  # type: ignore[arg-type]
    alpn, identity = await handshake(fed_server(pki), fed_client(pki, pki.client))
    assert alpn == ALPN_FEDERATION
    assert identity is not None
    assert identity.cert_fingerprint == pki.client.fingerprint
    assert identity.subject == "CN=node-a"
    assert "urn:qpc:node:a" in identity.san_names


async def test_plain_client_presents_no_cert_and_has_no_identity(pki: PkiFixture) -> None:
    alpn, identity = await handshake(
        fed_server(pki), ClientTLS(ALPN_CLIENT, pin=pki.server.fingerprint)
    )
    assert (alpn, identity) == (ALPN_CLIENT, None)


async def test_no_client_cert_refused(pki: PkiFixture) -> None:
    err = await refused(fed_server(pki), fed_client(pki, None))
    assert err.error_code == CERTIFICATE_REQUIRED


async def test_cert_from_another_ca_refused(pki: PkiFixture) -> None:
    err = await refused(fed_server(pki), fed_client(pki, pki.other_ca_client))
    assert err.error_code == UNKNOWN_CA


async def test_expired_cert_refused(pki: PkiFixture) -> None:
    err = await refused(fed_server(pki), fed_client(pki, pki.expired_client))
    assert err.error_code == CERTIFICATE_EXPIRED


@pytest.mark.parametrize("alpn", ["h3", "qpc/2", "qpc-fed/0"])
async def test_wrong_alpn_refused(pki: PkiFixture, alpn: str) -> None:
    err = await refused(fed_server(pki), ClientTLS(alpn, pin=pki.server.fingerprint))
    assert err.error_code == NO_APPLICATION_PROTOCOL


async def test_federation_alpn_refused_when_no_federation_trust_configured(
    pki: PkiFixture,
) -> None:
    err = await refused(ServerTLS(pki.server), fed_client(pki, pki.client))
    assert err.error_code == NO_APPLICATION_PROTOCOL


async def test_pinned_mode_accepts_pinned_peer_and_refuses_another(
    pki: PkiFixture, tmp_path: object
) -> None:
    import pathlib

    base = pathlib.Path(str(tmp_path))
    peer_a = load_or_create_node_credentials(base / "a")
    peer_b = load_or_create_node_credentials(base / "b")
    server_tls = ServerTLS(pki.server, pinned_peers=frozenset({peer_a.fingerprint}))
    _, identity = await handshake(server_tls, fed_client(pki, peer_a))
    assert identity is not None and identity.cert_fingerprint == peer_a.fingerprint
    err = await refused(server_tls, fed_client(pki, peer_b))
    assert err.error_code == BAD_CERTIFICATE
    # A CA-signed cert does not help in pure pinned mode either.
    err = await refused(server_tls, fed_client(pki, pki.client))
    assert err.error_code == BAD_CERTIFICATE


async def test_client_pin_mismatch_refused(pki: PkiFixture) -> None:
    wrong_pin = pki.client.fingerprint
    err = await refused(ServerTLS(pki.server), ClientTLS(ALPN_CLIENT, pin=wrong_pin))
    assert err.error_code == BAD_CERTIFICATE


async def test_client_ca_mode_verifies_server_chain_and_name(pki: PkiFixture) -> None:
    ok = ClientTLS(ALPN_CLIENT, ca=pki.ca.certificate_pem, server_name="localhost")
    assert (await handshake(ServerTLS(pki.server), ok))[0] == ALPN_CLIENT
    stranger = ClientTLS(ALPN_CLIENT, ca=pki.other_ca.certificate_pem)
    assert (await refused(ServerTLS(pki.server), stranger)).error_code == UNKNOWN_CA
    wrong_name = ClientTLS(ALPN_CLIENT, ca=pki.ca.certificate_pem, server_name="node.example")
    assert (await refused(ServerTLS(pki.server), wrong_name)).error_code == BAD_CERTIFICATE


async def test_handshake_counters_by_role_and_result(pki: PkiFixture) -> None:
    """One accepted and one refused (no client certificate) federation handshake show up
    on both endpoints (qpc_quic_handshakes{role,result})."""

    async def handler(conn: Connection, stream: QuicStream) -> None:
        await stream.send_all(b"ok")

    with trio.fail_after(20):
        async with (
            open_endpoint("127.0.0.1", 0, server_tls=fed_server(pki), settings=FAST) as server,
            serving(server, handler),
            open_endpoint("127.0.0.1", 0, settings=FAST) as client,
        ):
            conn = await client.connect(*server.local_address, fed_client(pki, pki.client))
            with pytest.raises(HandshakeError):
                await client.connect(*server.local_address, fed_client(pki, None))
            s, c = server.statistics(), client.statistics()
            assert (s.handshakes_ok_server, c.handshakes_ok_client) == (1, 1)
            assert (s.handshakes_ok_client, c.handshakes_ok_server) == (0, 0)
            await conn.aclose()
            # the refused connections end after their closing period: wait for both sides
            for _ in range(200):
                s, c = server.statistics(), client.statistics()
                if s.handshakes_failed_server and c.handshakes_failed_client:
                    break
                await trio.sleep(0.05)
            assert (s.handshakes_failed_server, c.handshakes_failed_client) == (1, 1)
            # the accepted one, now closed, still counts as completed
            assert (s.handshakes_ok_server, c.handshakes_ok_client) == (1, 1)

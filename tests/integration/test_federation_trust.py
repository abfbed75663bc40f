"""Federation trust over real QUIC handshakes on loopback: mesh TOFU pins and managed CA.

Every refusal case is a real handshake (or an admission right after it) that
must end without a link: no certificate, wrong CA, expired, changed key, wrong
ALPN. The accepted cases show the same socket still serving plain clients.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import pytest
import trio

from qpc_node.errors import StatusCode
from qpc_node.federation.core import M_PING, StaticPeer
from qpc_node.federation.trust import KeyChanged
from qpc_node.node import KEYS_SUBDIR
from qpc_node.quic import ALPN_CLIENT, ALPN_FEDERATION, ClientTLS, HandshakeError, open_endpoint
from qpc_node.quic.tls import issue_certificate, make_ca
from qpc_node.rpc.client import NO_RETRY, RpcClient
from qpc_node.rpc.errors import RpcError
from qpc_node.store.federation import load_trust
from qpc_node.wire.gen.qpc.v1 import federation_pb2, health_pb2
from tests.integration.fed_nodes import (
    fed_node,
    free_port,
    identity,
    install_credentials,
    node_dir,
    until,
)
from tests.integration.node_harness import running_node


async def test_tofu_pins_both_sides_and_keeps_them_across_restart(tmp_path: Path) -> None:
    _, a_id = identity(tmp_path, "a")
    _, b_id = identity(tmp_path, "b")
    with trio.fail_after(30):
        async with fed_node(tmp_path, "b") as b:
            async with fed_node(tmp_path, "a", peers=(StaticPeer("127.0.0.1", b.info.port),)) as a:
                await a.fed.wait_link(b_id)
                await b.fed.wait_link(a_id)
                assert [(p.node_id, p.state) for p in a.fed.policy.pins()] == [(b_id, "trusted")]  # type: ignore[attr-defined]
                assert [(p.node_id, p.state) for p in b.fed.policy.pins()] == [(a_id, "trusted")]  # type: ignore[attr-defined]
                assert await a.fed.ping(b_id) > 0
            assert b.node.store is not None
            snap = await b.node.store.run(load_trust)
        assert [(p.node_id, p.state) for p in snap.pins] == [(a_id, "trusted")]
        async with fed_node(tmp_path, "b") as b2:  # restarted: the pin came back from SQLite
            assert [p.node_id for p in b2.fed.policy.pins()] == [a_id]  # type: ignore[attr-defined]


async def test_same_socket_serves_clients_and_federation(tmp_path: Path) -> None:
    """qpc/1 clients keep working on a federating node; they cannot call federation methods."""
    with trio.fail_after(30):
        async with fed_node(tmp_path, "b") as b, open_endpoint("127.0.0.1", 0) as ep:
            conn = await ep.connect(
                "127.0.0.1", b.info.port, ClientTLS(ALPN_CLIENT, pin=b.info.cert_fingerprint)
            )
            rpc = RpcClient(conn.open_stream, retry_policy=NO_RETRY)
            health = await rpc.call(
                "qpc.v1.Health/Check",
                health_pb2.HealthRequest(),
                health_pb2.HealthResponse,
            )
            assert health.status == health_pb2.HealthResponse.SERVING
            with pytest.raises(RpcError) as info:
                await rpc.call(
                    M_PING, federation_pb2.PingRequest(nonce=1), federation_pb2.PingResponse
                )
            assert info.value.code == StatusCode.UNIMPLEMENTED
            assert b.fed.statistics().neighbours == ()


async def test_federation_without_client_certificate_refused(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with fed_node(tmp_path, "b") as b, open_endpoint("127.0.0.1", 0) as ep:
            tls = ClientTLS(ALPN_FEDERATION, pin=b.info.cert_fingerprint)  # no credentials
            with pytest.raises(HandshakeError):
                await ep.connect("127.0.0.1", b.info.port, tls)
            assert b.fed.links() == []


async def test_federation_alpn_refused_by_a_node_without_federation(tmp_path: Path) -> None:
    creds, _ = identity(tmp_path, "a")
    with trio.fail_after(30):
        async with (
            running_node(tmp_path / "plain") as (_, info),
            open_endpoint("127.0.0.1", 0) as ep,
        ):
            tls = ClientTLS(ALPN_FEDERATION, pin=info.cert_fingerprint, credentials=creds)
            with pytest.raises(HandshakeError):
                await ep.connect("127.0.0.1", info.port, tls)


async def test_changed_key_refused_loudly_until_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    _, a_id = identity(tmp_path, "a")
    _, b1 = identity(tmp_path, "b")
    with trio.fail_after(45):
        async with fed_node(tmp_path, "a", peers=(StaticPeer("127.0.0.1", port),)) as a:
            async with fed_node(tmp_path, "b", port=port):
                await a.fed.wait_link(b1)
            await until(lambda: not a.fed.link_up(b1))
            # B comes back at the same address with a new key (a new node id).
            shutil.rmtree(node_dir(tmp_path, "b") / KEYS_SUBDIR)
            _, b2 = identity(tmp_path, "b")
            assert b2 != b1
            with caplog.at_level(logging.ERROR, logger="qpc.federation.trust"):
                async with fed_node(tmp_path, "b", port=port) as b:
                    policy = a.fed.policy
                    await until(lambda: [p.node_id for p in policy.pending()] == [b2])  # type: ignore[attr-defined]
                    assert not a.fed.link_up(b2)
                    assert any("KEY CHANGED" in r.getMessage() for r in caplog.records)
                    # Dialled for the old node id: refused inside the handshake.
                    with pytest.raises(HandshakeError):
                        await a.fed.connect("127.0.0.1", port, expected=b1)
                    # Dialled by address: the refused id is now refused in the handshake too.
                    with pytest.raises(HandshakeError):
                        await a.fed.connect("127.0.0.1", port)
                    # B dialling A is refused the same way (A checks B's address).
                    with pytest.raises(
                        (KeyChanged, HandshakeError, RpcError, trio.BrokenResourceError)
                    ):
                        await b.fed.connect("127.0.0.1", a.info.port, expected=a_id)
                        await b.fed.ping(a_id)
                    assert not a.fed.link_up(b2)
                    # The operator accepts the new key: the redial now links.
                    await a.fed.trust(b2)
                    await a.fed.wait_link(b2)
                    assert a.node.store is not None
                    snap = await a.node.store.run(load_trust)
                    assert {p.node_id: p.state for p in snap.pins} == {b1: "trusted", b2: "trusted"}
                    assert dict(snap.addresses)[f"127.0.0.1:{port}"] == b2


async def test_mesh_mode_refuses_an_expired_certificate(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    old = issue_certificate(
        make_ca(),
        "old-node",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    install_credentials(tmp_path, "old", old)
    with trio.fail_after(30):
        async with fed_node(tmp_path, "a") as a, fed_node(tmp_path, "old") as old_node:
            with pytest.raises(HandshakeError):  # A refuses the server's certificate
                await a.fed.connect("127.0.0.1", old_node.info.port)
            with pytest.raises(HandshakeError):  # A's server side refuses it as a client
                await old_node.fed.connect("127.0.0.1", a.info.port)
            assert a.fed.links() == [] and old_node.fed.links() == []


async def test_managed_mode_community_ca(tmp_path: Path) -> None:
    """Same CA: linked. Another CA or an expired certificate: refused, both directions."""
    ca, other = make_ca("community"), make_ca("stranger")
    now = dt.datetime.now(dt.UTC)
    install_credentials(tmp_path, "a", issue_certificate(ca, "a"))
    install_credentials(tmp_path, "b", issue_certificate(ca, "b"))
    install_credentials(tmp_path, "x", issue_certificate(other, "x"))
    expired = issue_certificate(
        ca, "old", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    install_credentials(tmp_path, "old", expired)
    managed = {"mode": "managed", "ca_pem": ca.certificate_pem}
    with trio.fail_after(45):
        async with (
            fed_node(tmp_path, "a", **managed) as a,  # type: ignore[arg-type]
            fed_node(tmp_path, "b", **managed) as b,  # type: ignore[arg-type]
            fed_node(tmp_path, "x", mode="managed", ca_pem=other.certificate_pem) as x,
            fed_node(tmp_path, "old", **managed) as old,  # type: ignore[arg-type]
        ):
            assert await a.fed.connect("127.0.0.1", b.info.port) == b.node_id
            await b.fed.wait_link(a.node_id)
            for stranger in (x, old):
                with pytest.raises(HandshakeError):
                    await a.fed.connect("127.0.0.1", stranger.info.port)
                with pytest.raises(HandshakeError):
                    await stranger.fed.connect("127.0.0.1", a.info.port)
            assert [link.node_id for link in a.fed.links()] == [b.node_id]
            assert a.fed.statistics().trust_refusals >= 2

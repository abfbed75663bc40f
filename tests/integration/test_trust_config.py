"""Issue 12 trust modes as an operator configures them: real Node, QUIC, SQLite on loopback.

Managed mode from ``federation.ca/cert/key`` (the CA-issued pair becomes the node's
identity); mesh mode's changed key accepted with ``/mesh trust`` over the client
``qpc/1`` RPC (loopback only), after which the link comes up without a restart.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import pytest
import trio
from node_harness import node_config

from qpc_node.client.connect import open_agent
from qpc_node.errors import StatusCode
from qpc_node.mesh.nodeid import node_id_of_credentials
from qpc_node.mesh.service import MeshService
from qpc_node.node import KEYS_SUBDIR, Node, NodeInfo
from qpc_node.ops.clock import ManualWallClock
from qpc_node.quic.tls import CertificateAuthority, NodeCredentials, issue_certificate, make_ca
from qpc_node.repl.runner import format_trust
from qpc_node.rpc.errors import RpcError
from tests.integration.fed_nodes import free_port, identity, node_dir, until

pytestmark = pytest.mark.timeout(120)


def peers_text(peers: list[tuple[int, bytes]]) -> str:
    return ",".join(f"127.0.0.1:{p}#{nid.hex()}" for p, nid in peers)


@asynccontextmanager
async def configured_node(
    tmp: Path, name: str, port: int, peers: list[tuple[int, bytes]], **sections: dict[str, str]
) -> AsyncIterator[tuple[Node, NodeInfo]]:
    """A node built from config only (no programmatic FederationSetup)."""
    cfg = node_config(
        tmp / name,
        node={"listen": f"127.0.0.1:{port}", "drain_grace_s": "0.2"},
        mesh={"static_peers": peers_text(peers)},
        **sections,
    )
    node = Node(cfg, default_data=node_dir(tmp, name))
    async with trio.open_nursery() as nursery:
        info: NodeInfo = await nursery.start(node.run)
        yield node, info
        nursery.cancel_scope.cancel()


def mesh_of(node: Node) -> MeshService:
    assert node.mesh is not None
    return node.mesh


def managed_files(
    tmp: Path,
    name: str,
    ca: CertificateAuthority,
    trusted: bytes,
    key_type: Literal["ed25519", "p256"] = "ed25519",
) -> dict[str, str]:
    """The ``federation`` section for a node with a certificate from ``ca``, trusting
    the CA whose certificate is ``trusted``."""
    creds = issue_certificate(ca, f"node-{name}", key_type=key_type)
    d = tmp / "pki" / name
    d.mkdir(parents=True)
    (d / "ca.pem").write_bytes(trusted)
    (d / "node.crt").write_bytes(creds.certificate_pem + creds.chain_pem)
    (d / "node.key").write_bytes(creds.private_key_pem)
    os.chmod(d / "node.key", 0o600)
    return {
        "mode": "managed",
        "ca": str(d / "ca.pem"),
        "cert": str(d / "node.crt"),
        "key": str(d / "node.key"),
    }


def fed_credentials(section: dict[str, str]) -> NodeCredentials:
    return NodeCredentials(Path(section["cert"]).read_bytes(), Path(section["key"]).read_bytes())


async def test_managed_mode_from_config_links_its_ca_and_refuses_another(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca1, ca2 = make_ca("community"), make_ca("stranger")
    fed = {
        "a": managed_files(tmp_path, "a", ca1, ca1.certificate_pem),
        "b": managed_files(tmp_path, "b", ca1, ca1.certificate_pem),
        "x": managed_files(tmp_path, "x", ca2, ca2.certificate_pem),
    }
    ids = {n: node_id_of_credentials(fed_credentials(s)) for n, s in fed.items()}
    ports = {n: free_port() for n in fed}
    with trio.fail_after(60), caplog.at_level(logging.ERROR, logger="qpc.federation.trust"):
        async with (
            configured_node(
                tmp_path,
                "a",
                ports["a"],
                [(ports["b"], ids["b"]), (ports["x"], ids["x"])],
                federation=fed["a"],
            ) as (a, a_info),
            configured_node(
                tmp_path, "b", ports["b"], [(ports["a"], ids["a"])], federation=fed["b"]
            ) as (b, _),
            configured_node(
                tmp_path, "x", ports["x"], [(ports["a"], ids["a"])], federation=fed["x"]
            ) as (x, _),
        ):
            # The CA-issued key is the node's identity everywhere: mesh id, federation
            # id, and the certificate its clients pin.
            assert mesh_of(a).node_id == ids["a"] and a.federation is not None
            assert a.federation.node_id == ids["a"]
            assert a_info.cert_fingerprint == fed_credentials(fed["a"]).fingerprint
            assert not (node_dir(tmp_path, "a") / KEYS_SUBDIR / "node.key").exists()
            await a.federation.wait_link(ids["b"])
            # x (another CA) is refused both ways, and counted, until the test ends.
            assert x.federation is not None
            await until(lambda: a.federation.statistics().trust_refusals >= 2, within=20)  # type: ignore[union-attr]
            await until(lambda: x.federation.statistics().trust_refusals >= 1, within=20)  # type: ignore[union-attr]
            assert [link.node_id for link in a.federation.links()] == [ids["b"]]
            assert x.federation.links() == []
            peer_x = mesh_of(a).peers.get(ids["x"])
            assert peer_x is not None and peer_x.state.value != "up"
            assert b.federation is not None and b.federation.link_up(ids["a"])
            # ... and counted where an operator looks (/metrics, /stats).
            counted = {
                (smp.name, smp.labels): smp.value
                for smp in a.metrics.samples()
                if smp.name.startswith("qpc_federation_trust_refusals")
            }
            key = ("qpc_federation_trust_refusals_total", (("mode", "managed"),))
            assert counted.get(key, 0) >= 2, counted
    refusals = [r.getMessage() for r in caplog.records if "managed mode" in r.getMessage()]
    assert refusals, "the refusal of the foreign CA is logged"


async def test_managed_mode_refuses_to_start_with_a_key_that_is_not_ed25519(
    tmp_path: Path,
) -> None:
    ca = make_ca()
    from qpc_node.errors import ConfigError

    fed = managed_files(tmp_path, "p", ca, ca.certificate_pem, key_type="p256")

    with trio.fail_after(30), pytest.raises(BaseExceptionGroup) as info:
        async with configured_node(
            tmp_path, "p", free_port(), [(free_port(), b"\x01" * 32)], federation=fed
        ):
            pass  # pragma: no cover - refused before serving
    err: BaseException = info.value
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    assert isinstance(err, ConfigError) and "must be Ed25519" in str(err)


async def test_changed_key_accepted_with_mesh_trust_over_loopback_links_without_restart(
    tmp_path: Path, wall: ManualWallClock, caplog: pytest.LogCaptureFixture
) -> None:
    ids = {n: identity(tmp_path, n)[1] for n in "ab"}
    ports = {n: free_port() for n in "ab"}
    b_old = ids["b"]
    with trio.fail_after(90):
        async with configured_node(tmp_path, "a", ports["a"], [(ports["b"], b_old)]) as (
            a,
            a_info,
        ):
            fed = a.federation
            assert fed is not None
            async with configured_node(tmp_path, "b", ports["b"], [(ports["a"], ids["a"])]):
                await fed.wait_link(b_old)
            await until(lambda: not fed.link_up(b_old))
            # B comes back at the same address with a new key: a new node id.
            shutil.rmtree(node_dir(tmp_path, "b") / KEYS_SUBDIR)
            b_new = identity(tmp_path, "b")[1]
            with caplog.at_level(logging.ERROR, logger="qpc.federation.trust"):
                async with (
                    configured_node(tmp_path, "b", ports["b"], [(ports["a"], ids["a"])]) as (
                        b,
                        _,
                    ),
                    open_agent(
                        tmp_path / "users" / "op",
                        a_info.host,
                        a_info.port,
                        pin=a_info.cert_fingerprint,
                        wall_ms=wall,
                    ) as operator,
                ):
                    await until(lambda: b_new in fed.policy.known_ids(), within=20)  # type: ignore[attr-defined]
                    assert any("KEY CHANGED" in r.getMessage() for r in caplog.records)
                    assert not fed.link_up(b_new)
                    # A prefix that names nothing is a typed error, not a pin.
                    with pytest.raises(RpcError) as info:
                        await operator.mesh_trust("f" * 63 if b_new.hex()[0] != "f" else "0" * 63)
                    assert info.value.code == StatusCode.NOT_FOUND
                    # The operator on the node's machine trusts the new id by a prefix.
                    resp = await operator.mesh_trust(b_new.hex()[:12])
                    assert bytes(resp.node_id) == b_new
                    assert b_new.hex() in format_trust(resp)
                    # No restart of either node: the link comes up by itself.
                    await fed.wait_link(b_new)
                    # The trust change is in A's audit trail: who and which node.
                    store = a.store
                    assert store is not None

                    async def audited() -> bool:
                        rows = await store.audit_query(kind="federation.trust")  # type: ignore[union-attr]
                        return [r.event.detail.get("node") for r in rows] == [b_new.hex()]

                    await until(audited, within=10)
                    assert b.federation is not None
                    await b.federation.wait_link(ids["a"])
                    await until(lambda: mesh_of(a).peers.get(b_new) is not None, within=20)

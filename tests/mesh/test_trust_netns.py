"""Issue 12 must-show: whom a node federates with, with real ``qpc node`` processes in
network namespaces this test creates and removes.

(a) managed mode: two nodes with certificates from one community CA link and relay a
    DM; a third with another CA's certificate is refused (never up, refusal logged).
(b) mesh mode: B comes back at the same address with a new key; A refuses it loudly;
    a user connecting over the mesh cannot re-pin it (PERMISSION_DENIED); the operator's
    ``qpc trust PREFIX`` on A's machine brings the link up without a restart.
(c) a peer that is not trusted cannot relay: no client certificate, or a fresh key
    answering at a pinned node's address; nothing is stored.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mesh_procs import REPO, NodeProc, fingerprint, repl
from netns_kit import Host, Netns

from qpc_node.mesh.nodeid import node_id_of_credentials
from qpc_node.node import KEYS_SUBDIR
from qpc_node.quic.tls import (
    CertificateAuthority,
    NodeCredentials,
    issue_certificate,
    load_or_create_node_credentials,
    make_ca,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

CONVERGE_S = 60  # discovery/dial + links + routes + bindings on a loaded machine


def wait_for(check: Callable[[], str | None], within: float, what: str) -> float:
    """Poll ``check`` (None = not yet, else done) every 0.5 s; seconds it took."""
    t0 = time.monotonic()
    while True:
        if check() is not None:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < within, what
        time.sleep(0.5)


def peer_line(peers: str, node_id: str) -> str:
    return next((ln for ln in peers.splitlines() if node_id[:16] in ln), "")


def is_up(peers: str, node_id: str) -> bool:
    return " up " in peer_line(peers, node_id)


def qpc_in(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    argv = host.cmd([sys.executable, "-m", "qpc_node.cli", *args])
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=REPO, check=False, stdin=None
    )


def managed_env(tmp: Path, name: str, ca: CertificateAuthority) -> tuple[dict[str, str], bytes]:
    """``federation.*`` for a node whose certificate (and trust) is ``ca``'s."""
    creds = issue_certificate(ca, f"node-{name}")
    d = tmp / "pki" / name
    d.mkdir(parents=True)
    (d / "ca.pem").write_bytes(ca.certificate_pem)
    (d / "node.crt").write_bytes(creds.certificate_pem)
    (d / "node.key").write_bytes(creds.private_key_pem)
    os.chmod(d / "node.key", 0o600)
    env = {
        "QPC_FEDERATION_MODE": "managed",
        "QPC_FEDERATION_CA": str(d / "ca.pem"),
        "QPC_FEDERATION_CERT": str(d / "node.crt"),
        "QPC_FEDERATION_KEY": str(d / "node.key"),
    }
    return env, node_id_of_credentials(creds)


def node_key(data: Path) -> tuple[NodeCredentials, str]:
    """The node's key made ahead of its start (what `qpc node` would make), and its id."""
    creds = load_or_create_node_credentials(data / KEYS_SUBDIR)
    return creds, node_id_of_credentials(creds).hex()


def static_env(peer_ip: str, peer_id: str) -> dict[str, str]:
    return {"QPC_MESH_MDNS": "0", "QPC_MESH_STATIC_PEERS": f"{peer_ip}:4201#{peer_id}"}


def test_managed_mode_links_its_ca_and_refuses_a_foreign_ca(net: Netns, tmp_path: Path) -> None:
    a_host, b_host, x_host = net.host("a"), net.host("b"), net.host("x")
    for h in (a_host, b_host, x_host):
        net.connect(h, "br0")
    ca1, ca2 = make_ca("community"), make_ca("stranger")
    (a_env, a_id), (b_env, b_id) = managed_env(tmp_path, "a", ca1), managed_env(tmp_path, "b", ca1)
    x_env, x_id = managed_env(tmp_path, "x", ca2)
    a = NodeProc(a_host, tmp_path / "na", "mesh0", a_env)
    b = NodeProc(b_host, tmp_path / "nb", "mesh0", b_env)
    x = NodeProc(x_host, tmp_path / "nx", "mesh0", x_env)
    # The CA-issued key is each node's mesh id.
    assert (a.node_id, b.node_id, x.node_id) == (a_id.hex(), b_id.hex(), x_id.hex())
    ua, ub = tmp_path / "ua", tmp_path / "ub"
    b_user = fingerprint(ub)
    repl(b_host, b, ub, "/whoami\n")  # ub logs in on B: its home binding spreads

    def converged() -> str | None:
        peers = repl(a_host, a, ua, "/mesh peers\n")
        assert not is_up(peers, x.node_id), peers  # the foreign CA is never up
        routes = repl(a_host, a, ua, "/mesh routes\n")
        return peers if is_up(peers, b.node_id) and "(2 users homed" in routes else None

    took = wait_for(converged, CONVERGE_S, f"A never linked B: {a.stderr()}")
    # x was found by mDNS (zero config) and refused, in both directions, with a log line.
    wait_for(
        lambda: "" if "peer refused (managed mode)" in a.stderr() else None,
        CONVERGE_S,
        f"no refusal logged by A: {a.stderr()}",
    )
    wait_for(
        lambda: "" if "peer refused (managed mode)" in x.stderr() else None,
        CONVERGE_S,
        f"no refusal logged by X: {x.stderr()}",
    )
    assert x.node_id in a.stderr() or "unknown_ca" in a.stderr(), a.stderr()
    stats = repl(a_host, a, ua, "/stats\n")
    refused = next(
        (ln for ln in stats.splitlines() if "federation_trust_refusals_total{mode=managed}" in ln),
        "",
    )
    assert refused and int(refused.split()[-1]) >= 1, stats

    repl(a_host, a, ua, f"/dm {b_user} hello within the community\n")
    got = repl(b_host, b, ub, "/inbox --wait 20\n")
    assert "hello within the community" in got, (got, b.stderr())
    peers = repl(a_host, a, ua, "/mesh peers\n")
    assert is_up(peers, b.node_id) and not is_up(peers, x.node_id), peers
    x_peers = repl(x_host, x, tmp_path / "ux", "/mesh peers\n")
    assert " up " not in x_peers, x_peers
    print(f"\nmanaged netns: A-B linked and routed in {took:.1f} s; X (foreign CA) refused")


@pytest.mark.parametrize("discovery", ["static", "mdns"])
def test_changed_key_refused_until_the_operator_trusts_it(
    net: Netns, tmp_path: Path, discovery: str
) -> None:
    """``static``: each lists the other as ``ip:4201#id`` (A dials B for its pinned id);
    ``mdns``: zero-config discovery (B's new id arrives in its TXT record)."""
    a_host, b_host = net.host("a"), net.host("b")
    a_ip = net.connect(a_host, "br0").ipv4
    b_ip = net.connect(b_host, "br0").ipv4
    assert a_ip is not None and b_ip is not None
    _, a_id = node_key(tmp_path / "na")
    _, b_old = node_key(tmp_path / "nb1")

    def env(peer_ip: str, peer_id: str) -> dict[str, str]:
        return static_env(peer_ip, peer_id) if discovery == "static" else {}

    a = NodeProc(a_host, tmp_path / "na", "mesh0", env(b_ip, b_old))
    b = NodeProc(b_host, tmp_path / "nb1", "mesh0", env(a_ip, a_id))
    ua = tmp_path / "ua"

    def peers_of_a() -> str:
        return repl(a_host, a, ua, "/mesh peers\n")

    wait_for(lambda: "" if is_up(peers_of_a(), b_old) else None, CONVERGE_S, f"A-B: {a.stderr()}")
    # B restarts at the same address with a new key (a new data dir): a new node id.
    b.proc.kill()
    b.proc.wait(10)
    b2 = NodeProc(b_host, tmp_path / "nb2", "mesh0", env(a_ip, a_id))
    assert b2.node_id != b_old
    wait_for(
        lambda: "" if "KEY CHANGED" in a.stderr() else None,
        CONVERGE_S,
        f"A did not refuse the changed key loudly: {a.stderr()}",
    )
    assert b2.node_id in a.stderr()
    assert not is_up(peers_of_a(), b2.node_id)

    # A community user reaching A over the mesh may not re-pin it.
    r = subprocess.run(
        b_host.cmd(
            [sys.executable, "-m", "qpc_node.cli", "repl", "--server", f"{a_ip}:4201",
             "--pin", a.pin, "--data", str(tmp_path / "ub"), "--script", "-"]
        ),
        input=f"/mesh trust {b2.node_id[:12]}\n", capture_output=True, text=True,
        timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert r.returncode != 0 and "operator" in r.stderr, (r.stdout, r.stderr)
    assert not is_up(peers_of_a(), b2.node_id)

    # The operator, on A's machine (loopback), trusts the new key by a prefix.
    t0 = time.monotonic()
    r = qpc_in(
        a_host, "trust", b2.node_id[:12], "--server", "127.0.0.1:4201", "--pin", a.pin,
        "--data", str(ua),
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f"node {b2.node_id} changed key accepted" in r.stdout, r.stdout
    wait_for(
        lambda: "" if is_up(peers_of_a(), b2.node_id) else None,
        30,
        f"no link after trust: {a.stderr()}",
    )
    print(
        f"\nmesh netns ({discovery}): changed key refused; link up "
        f"{time.monotonic() - t0:.1f} s after trust"
    )


def test_an_untrusted_peer_cannot_relay(net: Netns, tmp_path: Path) -> None:
    a_host, b_host, m_host = net.host("a"), net.host("b"), net.host("m")
    a_ip = net.connect(a_host, "br0").ipv4
    b_ip = net.connect(b_host, "br0").ipv4
    net.connect(m_host, "br0")
    assert a_ip is not None and b_ip is not None
    _, a_id = node_key(tmp_path / "na")
    _, b_id = node_key(tmp_path / "nb")
    a = NodeProc(a_host, tmp_path / "na", "mesh0", static_env(b_ip, b_id))
    b = NodeProc(b_host, tmp_path / "nb", "mesh0", static_env(a_ip, a_id))
    ua = tmp_path / "ua"
    a_user = fingerprint(ua)
    wait_for(
        lambda: "" if is_up(repl(a_host, a, ua, "/mesh peers\n"), b_id) else None,
        CONVERGE_S,
        f"A-B: {a.stderr()}",
    )
    intruder = str(Path(__file__).with_name("fed_intruder.py"))

    def intrude(host: Host, case: str, bind: int = 0) -> dict[str, str]:
        argv = host.cmd([sys.executable, intruder, a_ip, "4201", a_user, case, "--bind", str(bind)])
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout.strip().splitlines()[-1]))

    # No client certificate: the handshake itself is refused (certificate required).
    nocert = intrude(m_host, "nocert")
    assert nocert["handshake"].startswith("refused"), nocert
    assert "certificate required" in nocert["handshake"], nocert
    # B is gone; a fresh key answers from B's address and port (where A pinned B).
    b.proc.kill()
    b.proc.wait(10)
    impostor = intrude(b_host, "selfsigned", bind=4201)
    assert impostor["handshake"].startswith("refused") or impostor["relay"].startswith("refused"), (
        impostor
    )
    wait_for(lambda: "" if "KEY CHANGED" in a.stderr() else None, 20, f"no refusal: {a.stderr()}")
    # Nothing was stored: stop A and read its database.
    a.proc.terminate()
    a.proc.wait(30)
    db = sqlite3.connect(f"file:{tmp_path / 'na' / 'node.db'}?mode=ro", uri=True)
    try:
        for table in ("messages", "relay_queue", "relay_seen"):
            (n,) = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
            assert n == 0, (table, n)
        trusted = {
            bytes(r[0]).hex()
            for r in db.execute("SELECT node_id FROM fed_pins WHERE state = 'trusted'")
        }
        assert trusted == {b_id}, trusted
    finally:
        db.close()
    print(f"\nuntrusted relay: nocert {nocert}; impostor {impostor}")


def zero_config_node(host: Host, data: Path, *flags: str) -> tuple[subprocess.Popen[str], str]:
    """``qpc node`` with no --listen, no config and no QPC_* settings (metrics off: its
    port would be the same in every namespace anyway); returns it and its pin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPC_")}
    env["QPC_METRICS_LISTEN"] = ""
    proc = host.popen(
        [sys.executable, "-m", "qpc_node.cli", "node", "--data", str(data), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "qpc node listening on HOST:PORT pin=FPR"
    assert line.startswith("qpc node listening on "), line
    return proc, line.rsplit(" ", 1)[1].strip().removeprefix("pin=")


def loopback_repl(host: Host, pin: str, user: Path, script: str) -> str:
    r = subprocess.run(
        host.cmd(
            [sys.executable, "-m", "qpc_node.cli", "repl", "--server", "127.0.0.1:4201",
             "--pin", pin, "--data", str(user), "--script", "-"]
        ),
        input=script, capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def test_zero_config_nodes_discover_each_other_and_local_only_stays_alone(
    net: Netns, tmp_path: Path
) -> None:
    """Two laptops on one WiFi with no uplink, no config: they link by mDNS and TOFU.
    A third with --local-only on the same segment is on no mesh. A machine with no
    network up at all still starts (discovery off)."""
    a_host, b_host, c_host, d_host = (net.host(n) for n in "abcd")
    for h in (a_host, b_host, c_host):
        net.connect(h, "br0")
    a, a_pin = zero_config_node(a_host, tmp_path / "na")
    zero_config_node(b_host, tmp_path / "nb")
    _, c_pin = zero_config_node(c_host, tmp_path / "nc", "--local-only")
    _, d_pin = zero_config_node(d_host, tmp_path / "nd")  # only loopback in its namespace
    _, b_id = node_key(tmp_path / "nb")
    _, c_id = node_key(tmp_path / "nc")
    ua = tmp_path / "ua"

    def linked() -> str | None:
        peers = loopback_repl(a_host, a_pin, ua, "/mesh peers\n")
        return peers if is_up(peers, b_id) else None

    took = wait_for(linked, CONVERGE_S, "zero-config nodes never linked")
    peers = loopback_repl(a_host, a_pin, ua, "/mesh peers\n")
    assert c_id[:16] not in peers, peers  # --local-only: not announced, not linked
    alone = "this node is not on a mesh"
    assert alone in loopback_repl(c_host, c_pin, tmp_path / "uc", "/mesh peers\n")
    assert alone in loopback_repl(d_host, d_pin, tmp_path / "ud", "/mesh peers\n")
    assert a.poll() is None
    print(f"\nzero config: two nodes linked by mDNS + TOFU in {took:.1f} s")

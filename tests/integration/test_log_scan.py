"""A full scenario at debug level leaves no secret or message text in any log."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from node_harness import start_node_process

from qpc_node.client.keyfile import KEY_FILE

pytestmark = pytest.mark.timeout(180)
TEXTS = ["zebra-plaintext-0001", "quokka-groupsecret-0002", "narwhal-reply-0003"]
PASSPHRASE = "pangolin-passphrase-0004"


async def repl(data: Path, port: int, pin: str, script: str, env: dict[str, str]) -> bytes:
    r = await trio.run_process(
        [
            sys.executable,
            "-m",
            "qpc_node.cli",
            "repl",
            "--server",
            f"127.0.0.1:{port}",
            "--pin",
            pin,
            "--data",
            str(data),
            "--script",
            "-",
        ],
        stdin=script.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **env},
    )
    assert r.returncode == 0, r.stderr
    return r.stderr  # logs; stdout is the user interface and shows texts by design


def fpr(data: Path, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "qpc_node.cli", "id", "--data", str(data), "--no-qr"],
        capture_output=True,
        check=True,
        text=True,
        env={**os.environ, **env},
    ).stdout
    return (
        next(x for x in out.splitlines() if x.startswith("fingerprint:"))
        .split(":", 1)[1]
        .replace(" ", "")
    )


async def test_logs_hold_no_secrets(tmp_path: Path) -> None:
    dbg = {"QPC_LOG": "debug"}
    alice_env = {**dbg, "QPC_PASSPHRASE": PASSPHRASE}
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    a_fp, b_fp = fpr(alice, alice_env), fpr(bob, dbg)
    node_log = tmp_path / "node.log"
    proc, info = await start_node_process(tmp_path / "node", dbg, log_file=node_log)
    logs = b""
    try:
        logs += await repl(bob, info.port, info.cert_fingerprint, "/whoami\n", dbg)
        logs += await repl(
            alice,
            info.port,
            info.cert_fingerprint,
            f"/dm {b_fp} {TEXTS[0]}\n/group create g\n/group invite g {b_fp}\n/group send g {TEXTS[1]}\n",
            alice_env,
        )
        logs += await repl(
            bob, info.port, info.cert_fingerprint, f"/inbox --wait 10\n/dm {a_fp} {TEXTS[2]}\n", dbg
        )
        logs += await repl(alice, info.port, info.cert_fingerprint, "/inbox --wait 10\n", alice_env)
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(20):
            await proc.wait()
        proc.kill()
    everything = logs + node_log.read_bytes()
    assert b"level=info" in everything and b"node serving" in everything, (
        "the scan must see real logs"
    )
    secrets: list[bytes] = [t.encode() for t in TEXTS] + [PASSPHRASE.encode()]
    for d in (alice, bob):
        raw = (d / KEY_FILE).read_bytes()
        secrets += [raw, raw.hex().encode(), base64.b64encode(raw)]
    key_pem = (tmp_path / "node" / "node-keys" / "node.key").read_bytes()
    secrets += [line for line in key_pem.splitlines() if line and not line.startswith(b"-----")]
    leaked = [s[:24] for s in secrets if s in everything]
    assert not leaked, f"found in logs: {leaked}"

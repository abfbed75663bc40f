"""A full scenario at debug level leaves no secret or message text in any log."""

from __future__ import annotations

import base64
import signal
from pathlib import Path

import pytest
import trio
from node_harness import cli_fingerprint, run_repl, start_node_process

from qpc_node.client.keyfile import KEY_FILE

pytestmark = pytest.mark.timeout(180)
TEXTS = ["zebra-plaintext-0001", "quokka-groupsecret-0002", "narwhal-reply-0003"]
PASSPHRASE = "pangolin-passphrase-0004"


async def repl(data: Path, port: int, pin: str, script: str, env: dict[str, str]) -> bytes:
    r = await run_repl(data, port, pin, script, env)
    assert r.returncode == 0, r.stderr
    return r.stderr  # logs; stdout is the user interface and shows texts by design


async def test_logs_hold_no_secrets(tmp_path: Path) -> None:
    dbg = {"QPC_LOG": "debug"}
    alice_env = {**dbg, "QPC_PASSPHRASE": PASSPHRASE}
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    a_fp, b_fp = cli_fingerprint(alice, alice_env), cli_fingerprint(bob, dbg)
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

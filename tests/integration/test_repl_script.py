"""`qpc repl --script -` drives a DM and a group exchange between two users."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio
from node_harness import cli_fingerprint, run_repl, start_node_process

from qpc_node.client.fingerprint import short_code

pytestmark = pytest.mark.timeout(180)


async def repl(data: Path, port: int, pin: str, script: str) -> subprocess.CompletedProcess[bytes]:
    return await run_repl(data, port, pin, script)


async def test_script_dm_and_group(tmp_path: Path) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    a_fp, b_fp = cli_fingerprint(alice), cli_fingerprint(bob)
    proc, info = await start_node_process(tmp_path / "node")
    try:
        # Bob connects once: that homes him here and uploads his KeyPackages.
        r = await repl(bob, info.port, info.cert_fingerprint, "/whoami\n")
        assert r.returncode == 0, r.stderr
        assert short_code(b_fp) in r.stdout.decode()

        r = await repl(
            alice,
            info.port,
            info.cert_fingerprint,
            f"# alice\n/dm {b_fp} hello bob\n/group create team\n"
            f"/group invite team {b_fp}\n/group send team hi team\n",
        )
        assert r.returncode == 0, r.stderr

        r = await repl(
            bob,
            info.port,
            info.cert_fingerprint,
            "/inbox --wait 10\n/group send team hi alice\n/quit\n/never-run\n",
        )
        out = r.stdout.decode()
        assert r.returncode == 0, r.stderr
        assert f"{short_code(a_fp)}: hello bob" in out
        assert f"[team] {short_code(a_fp)}: hi team" in out

        r = await repl(alice, info.port, info.cert_fingerprint, "/inbox --wait 10\n")
        assert r.returncode == 0, r.stderr
        assert f"[team] {short_code(b_fp)}: hi alice" in r.stdout.decode()

        # The first failing command stops the script with a non-zero status.
        r = await repl(
            alice, info.port, info.cert_fingerprint, "/whoami\n/group send nosuchgroup x\n/whoami\n"
        )
        assert r.returncode != 0
        assert "line 2: error" in r.stderr.decode()
        r = await repl(alice, info.port, info.cert_fingerprint, "/bogus\n")
        assert r.returncode == 2 and "usage:" in r.stderr.decode()
    finally:
        proc.terminate()
        with trio.move_on_after(10):
            await proc.wait()
        proc.kill()

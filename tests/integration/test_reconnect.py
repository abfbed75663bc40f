"""A running interactive REPL (on a pty) rides out a restart of its node process.

The node is stopped (SIGTERM: it drains and closes connections; SIGKILL: it
vanishes and the REPL only notices by silence) and started again on the same
port and data dir. The REPL must reconnect, re-authenticate and resume
receiving from its stored cursor without being restarted: every message shown
exactly once, the outage announced once and its end once.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
from node_harness import cli_fingerprint, run_repl, start_node_process
from repl_harness import PtyRepl, start_pty, start_pty_repl

from qpc_node.client.fingerprint import short_code

pytestmark = pytest.mark.timeout(180)

LOST = "connection to the node lost"
RESTORED = "connection to the node restored"
NOT_CONNECTED = "error: not connected to the node"


async def _stop(proc: trio.Process, sig: signal.Signals) -> None:
    proc.send_signal(sig)
    with trio.fail_after(30):
        await proc.wait()


async def test_pty_repl_survives_node_restart_sigterm(tmp_path: Path) -> None:
    await _restart_under_repl(tmp_path, signal.SIGTERM)


async def test_pty_repl_survives_node_restart_sigkill(tmp_path: Path) -> None:
    await _restart_under_repl(tmp_path, signal.SIGKILL)


async def _restart_under_repl(tmp_path: Path, sig: signal.Signals) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    a_fp, b_fp = cli_fingerprint(alice), cli_fingerprint(bob)
    from_bob = f"{short_code(b_fp)}: "
    node_data = tmp_path / "node"
    proc, info = await start_node_process(node_data)
    pin, port = info.cert_fingerprint, info.port

    async def bob_runs(script: str) -> str:
        r = await run_repl(bob, port, pin, script)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode()

    repl: PtyRepl | None = None
    try:
        await bob_runs("/whoami\n")  # homes bob here, uploads his KeyPackages
        # A short dead-peer timeout: after SIGKILL only silence tells the REPL.
        repl = await start_pty_repl(alice, port, pin, "--dead-peer-timeout", "3")
        await repl.wait_for("type /help")
        await bob_runs(f"/dm {a_fp} before-restart\n")
        await repl.wait_for(from_bob + "before-restart")
        repl.type(f"/dm {b_fp} alice-before")
        await repl.wait_for("sent to [")

        await _stop(proc, sig)
        sent_while_down = False
        if sig == signal.SIGTERM:
            # The node closed the connection: the REPL says so at once. A command
            # typed now waits (boundedly) for the connection, which comes back
            # while it waits -- or, on a slow machine, fails having sent nothing.
            await repl.wait_for(LOST)
            repl.type(f"/dm {b_fp} alice-while-down")
        # SIGKILL: restart at once; the REPL learns of the loss on its own
        # (dead-peer timeout) while the new node already runs.
        proc, again = await start_node_process(node_data, listen=f"127.0.0.1:{port}")
        assert (again.port, again.cert_fingerprint) == (port, pin)
        await repl.wait_for(RESTORED, timeout=60)
        if sig == signal.SIGTERM:
            await repl.wait_until(
                lambda: repl.count("sent to [") == 2 or repl.count(NOT_CONNECTED) == 1,
                "the command typed while down end either way",
            )
            sent_while_down = repl.count("sent to [") == 2

        await bob_runs(f"/dm {a_fp} after-restart\n")
        await repl.wait_for(from_bob + "after-restart")
        repl.type(f"/dm {b_fp} alice-after")
        await repl.wait_for("sent to [", count=3 if sent_while_down else 2)
        out = await bob_runs("/inbox --wait 10\n")
        from_alice = f"{short_code(a_fp)}: "
        assert out.count(from_alice + "alice-before") == 1, out
        assert out.count(from_alice + "alice-after") == 1, out
        assert out.count(from_alice + "alice-while-down") == int(sent_while_down), out

        # A last message orders everything before it: a message shown twice
        # (refetched after the restart) would have been shown by now.
        await bob_runs(f"/dm {a_fp} last\n")
        await repl.wait_for(from_bob + "last")
        for text in ("before-restart", "after-restart", "last"):
            assert repl.count(from_bob + text) == 1, repl.text
        assert (repl.count(LOST), repl.count(RESTORED)) == (1, 1), repl.text
        assert "receive failed" not in repl.text, repl.text
        # The same REPL process did all this; it still answers and exits cleanly.
        assert await repl.quit() == 0
    finally:
        if repl is not None:
            await repl.aclose()
        if proc.returncode is None:
            await _stop(proc, signal.SIGTERM)


async def test_qpc_node_and_repl_in_one_process(tmp_path: Path) -> None:
    """``qpc`` alone: the REPL's session is to its own node in the same process."""
    bob = tmp_path / "bob"
    b_fp = cli_fingerprint(bob)
    env = {"XDG_DATA_HOME": str(tmp_path / "home"), "QPC_NODE_LISTEN": "127.0.0.1:0"}
    a_fp = cli_fingerprint(tmp_path / "home" / "qpc", env)
    repl = await start_pty([], env)
    try:
        await repl.wait_for("type /help")
        line = next(x for x in repl.text.splitlines() if x.startswith("node on "))
        addr, pin = line.removeprefix("node on ").split(" pin=")
        port = int(addr.rsplit(":", 1)[1])
        r = await run_repl(bob, port, pin, f"/dm {a_fp} hi-own-node\n")
        assert r.returncode == 0, r.stderr.decode()
        await repl.wait_for(f"{short_code(b_fp)}: hi-own-node")
        repl.type(f"/dm {b_fp} hi-bob")
        await repl.wait_for("sent to [")
        r = await run_repl(bob, port, pin, "/inbox --wait 10\n")
        assert r.stdout.decode().count(f"{short_code(a_fp)}: hi-bob") == 1, r.stdout
        assert await repl.quit() == 0
    finally:
        await repl.aclose()

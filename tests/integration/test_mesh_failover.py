"""Issue 12: a REPL whose node dies fails over to another mesh node by itself.

Three real ``qpc node`` processes on loopback, peered by ``mesh.static_peers``
(a full triangle). User u runs an interactive REPL (on a pty) homed on A; v uses
C. After u's REPL has seen the peer list (/mesh peers), A is killed with SIGKILL:
u's REPL must notice, move to B or C on its own (one line "node X lost; now on
node Y"), re-home there (a new binding the mesh spreads), and every DM v sends
afterwards must show in u's REPL exactly once.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
from node_harness import cli_fingerprint, run_repl, start_node_process
from repl_harness import PtyRepl, start_pty_repl

from qpc_node.client.fingerprint import short_code
from tests.integration.fed_nodes import free_port, identity, node_dir

pytestmark = pytest.mark.timeout(240)


async def test_repl_fails_over_when_its_node_is_killed(tmp_path: Path) -> None:
    names = "abc"
    ids = {n: identity(tmp_path, n)[1] for n in names}
    ports = {n: free_port() for n in names}
    procs: dict[str, trio.Process] = {}
    pins: dict[str, str] = {}
    repl: PtyRepl | None = None
    try:
        for n in names:
            peers = ",".join(f"127.0.0.1:{ports[o]}#{ids[o].hex()}" for o in names if o != n)
            procs[n], info = await start_node_process(
                node_dir(tmp_path, n),
                {"QPC_MESH_STATIC_PEERS": peers},
                listen=f"127.0.0.1:{ports[n]}",
            )
            pins[n] = info.cert_fingerprint
        u, v = tmp_path / "u", tmp_path / "v"
        u_fp, v_fp = cli_fingerprint(u), cli_fingerprint(v)

        async def v_runs(script: str) -> str:
            r = await run_repl(v, ports["c"], pins["c"], script)
            assert r.returncode == 0, r.stderr.decode()
            return r.stdout.decode()

        repl = await start_pty_repl(
            u, ports["a"], pins["a"], "--dead-peer-timeout", "3", "--failover-after", "4"
        )
        await repl.wait_for("type /help")
        # u's REPL learns the mesh (and remembers it) once A is linked to B and C.
        with trio.fail_after(60):
            while True:
                mark = len(repl.text)
                repl.type("/mesh peers")
                try:
                    await repl.wait_until(
                        lambda m=mark: repl.text[m:].count(" up ") >= 2, "B and C up", 3
                    )
                    break
                except AssertionError:
                    continue  # links still coming up: ask again
        await v_runs("/whoami\n")  # homes v on C, uploads its KeyPackages
        # v's first DM (its KeyPackage fetch and Welcome) reaches u on A.
        with trio.fail_after(60):
            while "before" not in repl.text:
                out = await v_runs(f"/dm {u_fp} before\n")
                assert "sent to [" in out, out
                with trio.move_on_after(10):
                    await repl.wait_for(f"{short_code(v_fp)}: before")
        procs["a"].send_signal(signal.SIGKILL)
        with trio.fail_after(30):
            await procs["a"].wait()
        start = trio.current_time()
        await repl.wait_for("; now on node ", timeout=90)
        moved = trio.current_time() - start
        print(f"failover: u's REPL on a new node {moved:.1f} s after kill -9 of its node")
        assert f"node {ids['a'][:4].hex()} lost" in repl.text
        sent = [f"after-{i}" for i in range(3)]
        for text in sent:
            out = await v_runs(f"/dm {u_fp} {text}\n")
            assert "sent to [" in out, out
        for text in sent:
            # v's outbox retries at each start what the mesh could not take yet.
            with trio.fail_after(90):
                while f"{short_code(v_fp)}: {text}" not in repl.text:
                    await v_runs("/inbox\n")
                    with trio.move_on_after(5):
                        await repl.wait_for(f"{short_code(v_fp)}: {text}")
        # Exactly once, also after more receive rounds.
        repl.type("/inbox")
        await repl.wait_for("(no new messages)")
        for text in sent:
            assert repl.count(f"{short_code(v_fp)}: {text}") == 1, repl.text[-3000:]
        assert repl.count("; now on node ") == 1
        assert await repl.quit() == 0
        repl = None

        # Started again on the dead node's address: up on another node it remembers.
        repl = await start_pty_repl(u, ports["a"], pins["a"])
        await repl.wait_for("type /help", timeout=60)
        assert repl.count(f"127.0.0.1:{ports['a']} unreachable") == 1
        assert "sent to [" in await v_runs(f"/dm {u_fp} after-restart\n")
        with trio.fail_after(90):
            while f"{short_code(v_fp)}: after-restart" not in repl.text:
                await v_runs("/inbox\n")
                with trio.move_on_after(5):
                    await repl.wait_for(f"{short_code(v_fp)}: after-restart")
        # Only the new one: what the first REPL showed is not shown again.
        assert repl.count(f"{short_code(v_fp)}: after-") == 1
        assert await repl.quit() == 0
        repl = None
    finally:
        if repl is not None:
            await repl.aclose()
        for p in procs.values():
            if p.returncode is None:
                p.kill()
                with trio.move_on_after(10):
                    await p.wait()

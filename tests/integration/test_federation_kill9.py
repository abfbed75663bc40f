"""kill -9 of a relay process mid-way through 1,000 relayed envelopes: after a restart
every envelope it acknowledged is delivered, none twice (hop-by-hop custody in SQLite)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from qpc_node.federation.routes import StaticRoutes
from qpc_node.wire.gen.qpc.v1 import federation_pb2
from tests.integration.fed_nodes import (
    USER_A,
    USER_C,
    envelope,
    fed_node,
    free_port,
    identity,
    mailbox,
    peer,
    until,
    wrote_to,
)
from tests.integration.relay_kill9 import assert_exactly_once, kill_mid_way

N = 1000
REPO = Path(__file__).resolve().parents[2]


async def start_relay(spec: dict[str, object]) -> trio.Process:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.integration.fed_node_proc", json.dumps(spec)],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(30):
        while b"\n" not in buf:
            chunk = await proc.stdout.receive_some(1024)
            assert chunk, "relay process exited before it was ready"
            buf += chunk
    assert buf.startswith(b"ready ")
    return proc


async def test_relay_kill9_mid_way_loses_nothing_acknowledged(tmp_path: Path) -> None:
    _, a_id = identity(tmp_path, "a")
    _, b_id = identity(tmp_path, "b")
    _, c_id = identity(tmp_path, "c")
    pb, pc = free_port(), free_port()
    spec = {
        "tmp": str(tmp_path),
        "name": "b",
        "port": pb,
        "homes": {USER_C.hex(): c_id.hex()},
        "via": {},
        "peers": [["127.0.0.1", pc, c_id.hex()]],
    }
    msgs = [os.urandom(16) for _ in range(N)]
    proc: trio.Process | None = None
    try:
        with trio.fail_after(120):
            async with (
                fed_node(tmp_path, "c", port=pc, routes=StaticRoutes(c_id, {USER_C: c_id})) as c,
                fed_node(
                    tmp_path,
                    "a",
                    routes=StaticRoutes(a_id, {USER_C: c_id}, via={c_id: b_id}),
                    peers=(peer(pb, b_id),),
                ) as a,
            ):
                await wrote_to(c, USER_C, USER_A)  # N from USER_A: more than a stranger's share
                proc = await start_relay(spec)
                await a.fed.wait_link(b_id)
                for i in range(0, N, 100):
                    res = await a.fed.submit(
                        [envelope(m, USER_C) for m in msgs[i : i + 100]], origin=USER_A
                    )
                    assert {r.status for r in res} == {federation_pb2.RELAY_QUEUED}

                async def delivered() -> int:
                    return len(await mailbox(c, USER_C))

                async def kill() -> None:
                    assert proc is not None
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()

                async def restart() -> None:
                    nonlocal proc
                    proc = await start_relay(spec)

                run = await kill_mid_way(N, delivered, kill, restart)
                await until(lambda: a.fed.statistics().queued == 0)
                got = [e.msg_id for e in await mailbox(c, USER_C)]
        assert_exactly_once(got, msgs)
        print(f"delivered at kill -9: {run.at_kill}/{N}; after restart: {len(got)}/{N}")
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()

"""``qpc node`` freezes its start-up heap once it serves, and ``qpc`` (its node and a REPL
in one process) once the REPL's session is open (ops/memory.py says why)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from qpc_node.ops.memory import FREEZE_AFTER_S
from tests.integration.test_qpc_attach import Pty, _free_port

pytestmark = pytest.mark.timeout(90)


def test_qpc_node_freezes_its_start_up_heap_after_it_serves(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        QPC_LOG="debug",
        QPC_LOG_FORMAT="json",
        QPC_MESH_MDNS="0",
        QPC_METRICS_LISTEN="",
    )
    log = tmp_path / "node.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qpc_node.cli", "node", "--listen", "127.0.0.1:0",
             "--data", str(tmp_path / "node")],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert "listening" in proc.stdout.readline(), log.read_text()[-2000:]
            served = time.monotonic()
            frozen: list[dict[str, object]] = []
            deadline = served + FREEZE_AFTER_S + 30  # bounded: a busy machine is slower
            while not frozen and time.monotonic() < deadline:
                time.sleep(0.2)
                for line in log.read_text().splitlines():
                    if (
                        line.startswith("{")
                        and json.loads(line).get("msg") == "start-up heap frozen"
                    ):
                        frozen.append(json.loads(line))
            assert frozen, log.read_text()[-2000:]
            assert time.monotonic() - served >= FREEZE_AFTER_S - 0.5  # not before it served
            assert int(str(frozen[0]["objects"])) > 10_000, frozen
            assert proc.poll() is None  # and it keeps serving
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()


def _frozen_counts(text: str) -> list[int]:
    """The "objects" of each "start-up heap frozen" JSON log line (on a terminal the
    line may start after the REPL's prompt)."""
    lines = re.findall(r'\{[^{}]*"msg":"start-up heap frozen"[^{}]*\}', text)
    return [int(json.loads(line)["objects"]) for line in lines]


async def test_qpc_with_its_repl_freezes_its_start_up_heap(tmp_path: Path) -> None:
    port = _free_port()
    env = dict(
        os.environ,
        QPC_NODE_LISTEN=f"127.0.0.1:{port}",
        QPC_METRICS_LISTEN="",
        QPC_MESH_MDNS="0",
        QPC_LOG="debug",
        QPC_LOG_FORMAT="json",
        XDG_DATA_HOME=str(tmp_path),
        TERM="dumb",
    )
    qpc = Pty([sys.executable, "-m", "qpc_node.cli"], env)
    try:
        with trio.fail_after(FREEZE_AFTER_S + 60):  # bounded: a busy machine is slower
            await qpc.expect(b"qpc> ")
            opened = time.monotonic()
            await qpc.expect(b'"start-up heap frozen"')
            assert time.monotonic() - opened >= FREEZE_AFTER_S - 0.5  # not before it ran
            await qpc.expect(b"}")  # the rest of that log line
            qpc.send(b"/whoami\r")  # the REPL and its node still answer
            await qpc.expect(b"fingerprint")
            qpc.send(b"/quit\r")
            assert await qpc.exit_code() == 0, qpc.seen[-2000:]
        counts = _frozen_counts(qpc.seen.decode(errors="replace"))
        assert counts and counts[0] > 10_000, counts  # node + REPL start-up objects
    finally:
        qpc.kill()

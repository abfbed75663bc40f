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
from repl_harness import start_pty

from qpc_node.ops.memory import FREEZE_AFTER_S

pytestmark = pytest.mark.timeout(90)


def _frozen_counts(text: str) -> list[int]:
    """The "objects" of each "start-up heap frozen" JSON log line (on a terminal the
    line may start after the REPL's prompt)."""
    lines = re.findall(r'\{[^{}]*"msg":"start-up heap frozen"[^{}]*\}', text)
    return [int(json.loads(line)["objects"]) for line in lines]


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
            frozen: list[int] = []
            deadline = served + FREEZE_AFTER_S + 30  # bounded: a busy machine is slower
            while not frozen and time.monotonic() < deadline:
                time.sleep(0.2)
                frozen = _frozen_counts(log.read_text())
            assert frozen, log.read_text()[-2000:]
            assert time.monotonic() - served >= FREEZE_AFTER_S - 0.5  # not before it served
            assert frozen[0] > 10_000, frozen
            assert proc.poll() is None  # and it keeps serving
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()


async def test_qpc_with_its_repl_freezes_its_start_up_heap(tmp_path: Path) -> None:
    env = {
        "QPC_NODE_LISTEN": "127.0.0.1:0",  # qpc's REPL attaches to the port its node got
        "QPC_METRICS_LISTEN": "",
        "QPC_MESH_MDNS": "0",
        "QPC_LOG": "debug",
        "QPC_LOG_FORMAT": "json",
        "XDG_DATA_HOME": str(tmp_path),
    }
    qpc = await start_pty([], env)
    try:
        bound = FREEZE_AFTER_S + 60  # bounded: a busy machine is slower
        await qpc.wait_for("/quit to leave", timeout=bound)  # the REPL is up
        opened = time.monotonic()
        await qpc.wait_until(
            lambda: bool(_frozen_counts(qpc.text)), "the freeze log line", timeout=bound
        )
        assert time.monotonic() - opened >= FREEZE_AFTER_S - 0.5  # not before it ran
        qpc.type("/whoami")  # the REPL and its node still answer
        await qpc.wait_for("fingerprint")
        assert await qpc.quit() == 0, qpc.text[-2000:]
        counts = _frozen_counts(qpc.text)
        assert counts and counts[0] > 10_000, counts  # node + REPL start-up objects
    finally:
        await qpc.aclose()

"""``qpc node`` freezes its start-up heap once it serves (ops/memory.py says why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qpc_node.ops.memory import FREEZE_AFTER_S

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

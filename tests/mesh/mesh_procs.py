"""Real ``qpc node`` and ``qpc repl`` processes inside the namespaces of a test.

Shared by the mesh tests: a node process (its pin and mesh id read from its first two
lines), one-shot REPL scripts in a namespace, and a user's fingerprint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from netns_kit import Host

REPO = Path(__file__).resolve().parents[2]


class NodeProc:
    def __init__(
        self, host: Host, data: Path, interfaces: str, extra_env: Mapping[str, str] | None = None
    ) -> None:
        """``extra_env``: more ``QPC_*`` settings (e.g. ``federation.*``, static peers),
        applied after the defaults here (so ``QPC_MESH_MDNS`` may be overridden)."""
        self.host = host
        self.data = data
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close())
        env = dict(
            os.environ,
            QPC_METRICS_LISTEN="",
            QPC_MESH_MDNS="1",
            QPC_MESH_INTERFACES=interfaces,
        )
        env.update(extra_env or {})
        self.proc = host.popen(
            [sys.executable, "-m", "qpc_node.cli", "node", "--listen", "[::]:4201",
             "--data", str(data)],
            stdout=subprocess.PIPE, stderr=self._log, cwd=REPO, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "qpc node listening on HOST:PORT pin=FPR"
        assert line, self.stderr()
        self.pin = line.rsplit(" ", 1)[1].strip().removeprefix("pin=")
        mesh_line = self.proc.stdout.readline()  # "qpc node mesh id HEX"
        assert mesh_line.startswith("qpc node mesh id "), (mesh_line, self.stderr())
        self.node_id = mesh_line.split()[-1]
        host.kit.add_cleanup(self._log.close)

    def stderr(self) -> str:
        self._log.seek(0)
        return self._log.read()[-3000:]


def repl(host: Host, node: NodeProc, user_dir: Path, script: str) -> str:
    addr = host.links[0].ipv4
    argv = host.cmd(
        [sys.executable, "-m", "qpc_node.cli", "repl", "--server", f"{addr}:4201",
         "--pin", node.pin, "--data", str(user_dir), "--script", "-"]
    )  # fmt: skip
    r = subprocess.run(
        argv, input=script, capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def fingerprint(user_dir: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "qpc_node.cli", "id", "--data", str(user_dir), "--no-qr"],
        capture_output=True, check=True, text=True, cwd=REPO,
    ).stdout  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("fingerprint:"))
    return line.split(":", 1)[1].replace(" ", "")

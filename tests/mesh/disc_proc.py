"""A discovery process (``python -m qpc_node.mesh.discovery``) in a namespace, read live."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from netns_kit import Host

REPO = Path(__file__).resolve().parents[2]


def node_id(i: int) -> str:
    return f"{i + 1:02x}" * 32


class DiscProc:
    def __init__(
        self, host: Host, index: int, *, port: int | None = None, extra: Sequence[str] = ()
    ) -> None:
        self.host = host
        self.node = node_id(index)
        self.port = port if port is not None else 4201 + index
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        # a pipe nobody reads could fill and block the process: stderr goes to a file
        self._err = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by the kit)
        self.launched = time.time()
        self.proc = host.popen(
            [sys.executable, "-m", "qpc_node.mesh.discovery",
             "--node-id", self.node, "--port", str(self.port), "--seconds", "120", *extra],
            stdout=subprocess.PIPE, stderr=self._err, cwd=REPO,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        host.kit.add_cleanup(self.close)

    def close(self) -> None:
        """Kit cleanup (the process is dead): let the reader see EOF, close our files."""
        self._reader.join(5)
        self._err.close()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = json.loads(line)
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"ev": "eof", "t": time.time()})
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[dict[str, Any]]], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while not pred(self.events):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def seen(self) -> dict[str, dict[str, Any]]:
        """First peer_seen per node."""
        out: dict[str, dict[str, Any]] = {}
        with self._cond:
            for e in self.events:
                if e["ev"] == "peer_seen":
                    out.setdefault(e["node"], e)
        return out

    def of(self, kind: str, node: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [
                e for e in self.events if e["ev"] == kind and (node is None or e["node"] == node)
            ]

    def stats(self) -> dict[str, Any]:
        """The latest statistics line ({} before the first)."""
        lines = self.of("stats")
        return lines[-1] if lines else {}

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()[-3000:]

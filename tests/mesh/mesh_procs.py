"""Real ``qpc node`` and ``qpc repl`` processes inside the namespaces of a test.

Shared by the mesh tests: a node process (its pin and mesh id read from its first two
lines; with ``log="info"`` its JSON log lines can be read back as events), one-shot REPL
scripts in a namespace, a user's fingerprint, and ``MeshUser``: one long-lived
interactive REPL on a pty (what a user runs; far cheaper than a process per command).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from netns_kit import Host

from qpc_node.repl.commands import USAGE
from tests.integration.repl_harness import PtyRepl, start_pty

REPO = Path(__file__).resolve().parents[2]


class NodeProc:
    """``qpc node`` in ``host``'s namespace, listening on ``[::]:4201`` by default.

    ``ready=False`` returns as soon as the process is launched (start several nodes
    at once, then ``wait_ready()`` each). ``log``: the node's log level; its lines
    are JSON (``log_events``). ``env`` (also the 4th positional argument): more
    ``QPC_*`` settings (e.g. ``federation.*``, static peers), applied after the
    defaults here (so ``QPC_MESH_MDNS`` may be overridden). ``args``: more command-line
    arguments (e.g. ``--config FILE``).
    """

    def __init__(
        self,
        host: Host,
        data: Path,
        interfaces: str,
        env: Mapping[str, str] | None = None,
        *,
        ready: bool = True,
        log: str | None = None,
        port: int = 4201,
        args: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.data = data
        self.port = port
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close())
        full_env = dict(
            os.environ,
            QPC_METRICS_LISTEN="",
            QPC_MESH_MDNS="1",
            QPC_MESH_INTERFACES=interfaces,
        )
        if log is not None:
            full_env.update(QPC_LOG=log, QPC_LOG_FORMAT="json")
        full_env.update(env or {})
        self.launched = time.time()
        self.proc = host.popen(
            [sys.executable, "-m", "qpc_node.cli", "node", "--listen", f"[::]:{port}",
             "--data", str(data), *args],
            stdout=subprocess.PIPE, stderr=self._log, cwd=REPO, env=full_env,
        )  # fmt: skip
        host.kit.add_cleanup(self._log.close)
        self.pin = ""
        self.node_id = ""
        if ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Read the first two lines: the listening line (pin) and the mesh id."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "qpc node listening on HOST:PORT pin=FPR"
        assert line, self.stderr()
        self.pin = line.rsplit(" ", 1)[1].strip().removeprefix("pin=")
        mesh_line = self.proc.stdout.readline()  # "qpc node mesh id HEX"
        assert mesh_line.startswith("qpc node mesh id "), (mesh_line, self.stderr())
        self.node_id = mesh_line.split()[-1]

    def kill9(self) -> float:
        """``kill -9``; returns the wall time it was sent at."""
        t = time.time()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return t

    def stderr(self) -> str:
        self._log.seek(0)
        return self._log.read()[-3000:]

    def log_events(self, msg: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines so far (``log`` given), those with message ``msg`` if given."""
        self._log.seek(0)
        out = []
        for line in self._log.read().splitlines():
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if msg is None or ev.get("msg") == msg:
                out.append(ev)
        return out


def repl(
    host: Host, node: NodeProc, user_dir: Path, script: str, *, server: str | None = None
) -> str:
    """A one-shot ``qpc repl --script -`` in ``host``'s namespace (to ``node`` over the
    host's IPv4 address unless ``server`` says where)."""
    if server is None:
        server = f"{host.links[0].ipv4}:{node.port}"
    argv = host.cmd(
        [sys.executable, "-m", "qpc_node.cli", "repl", "--server", server,
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


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", re.M)


def scrape(host: Host, listen: str = "127.0.0.1:9201", *, labels: bool = False) -> dict[str, float]:
    """A node's /metrics (``metrics.listen`` = ``listen`` in ``host``'s namespace),
    each family's samples summed over their labels: {name: total}; with ``labels``
    each sample on its own: {name{labels}: value}."""
    code = (
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
        f"'http://{listen}/metrics', timeout=10).read().decode())"
    )
    r = subprocess.run(
        host.cmd([sys.executable, "-c", code]),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert r.returncode == 0, f"metrics of {host.name} at {listen}: {r.stderr[-500:]}"
    out: dict[str, float] = {}
    for name, lab, value in _SAMPLE.findall(r.stdout):
        key = name + lab if labels else name
        out[key] = out.get(key, 0.0) + float(value)
    return out


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


_HEAD = re.compile(r"node ([0-9a-f]{16})  \((\d+) users homed mesh-wide\)")
_PEER = re.compile(r"^  ([0-9a-f]{16})  (\S+)\s+(\S+)\s+rtt", re.M)
_FPR = re.compile(r"fingerprint: ([0-9a-f ]{79})")
_END = USAGE["mesh"]  # what /help mesh shows


class MeshUser:
    """One user's interactive ``qpc repl`` on a pty inside ``host``'s namespace.

    ``open()`` starts it and reads the user's fingerprint (``/whoami``); the caller
    ``aclose()``s it (the kit kills whatever runs in its namespaces anyway); ``ask()``
    types a command and waits for a needle in what it shows after that point;
    ``mesh_peers()`` reads one ``/mesh peers`` table.
    """

    def __init__(self, name: str, host: Host, pty: PtyRepl) -> None:
        self.name = name
        self.host = host
        self.pty = pty
        self.fpr = ""
        self.closed = False
        self.last_table = ""  # the last /mesh peers table read, as shown

    @classmethod
    async def open(
        cls, name: str, host: Host, node: NodeProc, user_dir: Path, *, server: str | None = None
    ) -> MeshUser:
        if server is None:
            server = f"{host.links[0].ipv4}:{node.port}"
        pty = await start_pty(
            ["repl", "--server", server, "--pin", node.pin, "--data", str(user_dir)],
            prefix=host.cmd([]),
        )
        user = cls(name, host, pty)
        try:
            out = await user.ask("/whoami", "short code:", timeout=60)
            m = _FPR.search(out)
            assert m, out
            user.fpr = m.group(1).replace(" ", "")
        except BaseException:
            await user.aclose()
            raise
        return user

    async def aclose(self) -> None:
        """Kill the REPL (if still running) and close its terminal; idempotent."""
        if not self.closed:
            self.closed = True
            await self.pty.aclose()

    def mark(self) -> int:
        self.pty.count("")  # read what is there first
        return len(self.pty.text)

    def since(self, mark: int) -> str:
        self.pty.count("")
        return self.pty.text[mark:]

    async def ask(self, line: str, needle: str, timeout: float = 30.0) -> str:  # noqa: ASYNC109 -- a bound
        """Type ``line``; wait until ``needle`` shows after it; what it showed since."""
        mark = self.mark()
        self.pty.type(line)
        await self.pty.wait_until(
            lambda: needle in self.pty.text[mark:], f"{needle!r} after {line!r}", timeout
        )
        return self.pty.text[mark:]

    async def wait_for(self, needle: str, timeout: float = 30.0, count: int = 1) -> None:  # noqa: ASYNC109 -- a bound
        await self.pty.wait_for(needle, timeout, count)

    async def mesh_peers(self, timeout: float = 20.0) -> tuple[int, dict[str, str]]:  # noqa: ASYNC109 -- a bound
        """One ``/mesh peers``: (users homed mesh-wide, {node id prefix: state}).

        The REPL runs commands in order, so ``/help mesh`` typed right after marks the
        end of the table (the prompt is not always redrawn as text after output)."""
        mark = self.mark()
        self.pty.type("/mesh peers")
        self.pty.type("/help mesh")

        def block() -> str | None:
            text = self.pty.text[mark:]
            m = _HEAD.search(text)
            if m is None:
                return None
            end = text.find(_END, m.end())
            return text[m.start() : end] if end >= 0 else None

        await self.pty.wait_until(lambda: block() is not None, "/mesh peers table", timeout)
        table = block()
        assert table is not None
        self.last_table = table
        head = _HEAD.search(table)
        assert head is not None
        return int(head.group(2)), {p: state for p, _addr, state in _PEER.findall(table)}


class Driver:
    """A ``tests.integration.agent_driver`` process (a user's client steered by JSON
    lines) inside a namespace; ``ask`` sends one command and reads its one answer."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = b""
        self.me = ""

    async def _line(self, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109 -- a bound
        assert self.proc.stdout is not None
        with trio.fail_after(timeout):
            while b"\n" not in self._buf:
                chunk = await self.proc.stdout.receive_some(65536)
                assert chunk, "the driver exited"
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        out: dict[str, Any] = json.loads(line)
        return out

    async def ask(self, cmd: dict[str, Any], timeout: float = 150.0) -> dict[str, Any]:  # noqa: ASYNC109 -- a bound
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(json.dumps(cmd).encode() + b"\n")
        return await self._line(timeout)


@asynccontextmanager
async def driver(
    host: Host,
    node: NodeProc,
    user_dir: Path,
    *,
    server: str | None = None,
    receive: bool = False,
    module: str = "tests.integration.agent_driver",
) -> AsyncIterator[Driver]:
    """Start the driver as ``user_dir``'s user on ``node``; killed on exit. ``module``:
    another driver speaking the same JSON lines (e.g. ``tests.mesh.partition_driver``)."""
    if server is None:
        server = f"{host.links[0].ipv4}:{node.port}"
    argv = [sys.executable, "-m", module, "--server", server,
            "--pin", node.pin, "--data", str(user_dir)] + (["--receive"] if receive else [])  # fmt: skip
    proc = await trio.lowlevel.open_process(
        host.cmd(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        d = Driver(proc)
        d.me = str((await d._line(60))["ready"])
        yield d
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                await stream.aclose()

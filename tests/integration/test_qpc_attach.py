"""``qpc`` alone, twice on one data dir: the second attaches a REPL to the node the
first one runs (the data-dir lock must not turn that into an error)."""

from __future__ import annotations

import os
import pty
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Pty:
    """``qpc`` on a pseudo-terminal, as a person runs it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        os.set_blocking(self.master, False)
        self.seen = b""

    async def _read(self) -> bool:
        """One chunk of output; False once the program has closed the terminal."""
        await trio.lowlevel.wait_readable(self.master)
        try:
            chunk = os.read(self.master, 4096)
        except OSError:  # EIO: nobody holds the terminal any more
            return False
        self.seen += chunk
        return bool(chunk)

    async def expect(self, text: bytes) -> None:
        while text not in self.seen:
            if not await self._read():
                raise AssertionError(f"{text!r} never came; saw {self.seen!r}")

    def send(self, text: bytes) -> None:
        os.write(self.master, text)

    async def exit_code(self) -> int:
        while await self._read():
            pass
        return await trio.to_thread.run_sync(self.proc.wait)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


async def test_second_qpc_attaches_to_the_running_node(tmp_path: Path) -> None:
    port = _free_port()
    env = dict(
        os.environ,
        QPC_NODE_LISTEN=f"127.0.0.1:{port}",
        QPC_METRICS_LISTEN="",
        XDG_DATA_HOME=str(tmp_path),  # both use the one data dir, tmp_path/qpc
        TERM="dumb",
    )
    argv = [sys.executable, "-m", "qpc_node.cli"]
    first = Pty(argv, env)
    try:
        with trio.fail_after(60):
            await first.expect(b"node on 127.0.0.1:%d" % port)
            await first.expect(b"qpc> ")
            second = Pty(argv, env)
            try:
                await second.expect(b"attaching to the node on 127.0.0.1:%d" % port)
                await second.expect(b"qpc> ")
                second.send(b"/whoami\r")
                await second.expect(b"fingerprint")
                second.send(b"/quit\r")
                assert await second.exit_code() == 0, second.seen
            finally:
                second.kill()
            first.send(b"/quit\r")
            assert await first.exit_code() == 0, first.seen
    finally:
        first.kill()

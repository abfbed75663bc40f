"""The interactive REPL as a user runs it: ``qpc repl`` on a pseudo-terminal.

``--script`` mode never runs the interactive receive loop or prompt_toolkit;
these helpers drive the real thing through a pty and read what the user would
see, with bounded waits (poll the output for a line with a deadline, never a
fixed sleep).
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import sys
import termios
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

# CSI and OSC sequences, and the carriage returns prompt_toolkit redraws with.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[=>()][0-9A-Za-z]?|\r"
)


class PtyRepl:
    """One ``qpc repl`` process attached to a pty; ``text`` is what it showed (ANSI stripped)."""

    def __init__(self, proc: trio.Process, master: int) -> None:
        self.proc = proc
        self._master = master
        self._raw = bytearray()
        self._cpr_answered = 0
        self.text = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> bool:
        """Read what is there; False once the child closed the terminal."""
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except BlockingIOError:
                return True
            except OSError:  # EIO: the child side is gone
                return False
            if not chunk:
                return False
            self._raw += chunk
            self.text = _ANSI.sub("", self._raw.decode("utf-8", "replace"))
            self._answer_cpr()

    def _answer_cpr(self) -> None:
        """Answer prompt_toolkit's cursor position requests as a terminal does."""
        asked = self._raw.count(b"\x1b[6n")
        while self._cpr_answered < asked:
            self._cpr_answered += 1
            try:
                os.write(self._master, b"\x1b[50;1R")  # the bottom row, as in a busy terminal
            except OSError:
                return

    async def wait_until(
        self,
        done: Callable[[], bool],
        what: str,
        timeout: float = 30.0,  # noqa: ASYNC109 -- a bound
    ) -> None:
        """Poll what the REPL shows until ``done()``; fails with the output so far."""
        with trio.move_on_after(timeout):
            while not done():
                with trio.move_on_after(0.5):  # the child may exit without a last write
                    await trio.lowlevel.wait_readable(self._master)
                if not self._pump():
                    break
        if not done():
            raise AssertionError(
                f"REPL did not show {what} within {timeout} s; it showed:\n" + self.text[-4000:]
            )

    async def wait_for(self, needle: str, timeout: float = 30.0, count: int = 1) -> None:  # noqa: ASYNC109 -- a bound
        """Until ``needle`` was shown ``count`` times."""
        await self.wait_until(
            lambda: self.text.count(needle) >= count, f"{needle!r} x{count}", timeout
        )

    def count(self, needle: str) -> int:
        self._pump()
        return self.text.count(needle)

    def type(self, line: str) -> None:
        """Type a line and press Enter (a terminal sends CR)."""
        os.write(self._master, line.encode() + b"\r")

    async def quit(self, timeout: float = 15.0) -> int:  # noqa: ASYNC109 -- a bound
        self.type("/quit")
        with trio.move_on_after(timeout):
            while self._pump():
                with trio.move_on_after(0.5):
                    await trio.lowlevel.wait_readable(self._master)
            return await self.proc.wait()
        raise AssertionError("REPL did not exit after /quit:\n" + self.text[-4000:])

    async def aclose(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            with trio.move_on_after(10):
                await self.proc.wait()
        os.close(self._master)


async def start_pty(
    args: list[str], env: dict[str, str] | None = None, *, prefix: Sequence[str] = ()
) -> PtyRepl:
    """``qpc ARGS`` on a fresh pty (50x200, so lines do not wrap); ``prefix`` runs it
    through a wrapper (``ip netns exec NS``, which execs it in place: same pid)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    os.set_blocking(master, False)
    try:
        proc = await trio.lowlevel.open_process(
            [*prefix, sys.executable, "-m", "qpc_node.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env={**os.environ, "TERM": "xterm", **(env or {})},
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return PtyRepl(proc, master)


async def start_pty_repl(
    data: Path, port: int, pin: str, *extra: str, env: dict[str, str] | None = None
) -> PtyRepl:
    """Interactive ``qpc repl`` attached to the node on 127.0.0.1:PORT."""
    args = ["repl", "--server", f"127.0.0.1:{port}", "--pin", pin, "--data", str(data)]
    return await start_pty([*args, *extra], env)

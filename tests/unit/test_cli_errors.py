"""``qpc``'s exit on errors a Trio nursery wrapped: a clear message or 130, no traceback."""

from __future__ import annotations

import argparse

import pytest
import trio

from qpc_node import cli
from qpc_node.errors import ConfigError


def _command_raising(*excs: BaseException) -> object:
    """A command that fails inside two nested nurseries, as `qpc` (node + REPL) does."""

    def command(args: argparse.Namespace) -> int:
        async def main() -> None:
            async with trio.open_nursery() as outer:
                outer.start_soon(trio.sleep_forever)
                async with trio.open_nursery() as inner:
                    for exc in excs:  # all in one scheduling batch: none is cancelled first
                        inner.start_soon(_raise, exc)
                    await trio.sleep_forever()

        trio.run(main)
        return 0

    return command


async def _raise(exc: BaseException) -> None:
    raise exc


def test_ctrl_c_inside_nurseries_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_cmd_version", _command_raising(KeyboardInterrupt()))
    assert cli.main(["version"]) == 130


def test_a_qpc_error_inside_nurseries_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_cmd_version", _command_raising(ConfigError("bad listen")))
    assert cli.main(["version"]) == 2
    assert capsys.readouterr().err == "qpc: error: bad listen\n"


def test_two_failures_stay_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    both = _command_raising(ConfigError("one"), KeyboardInterrupt())
    monkeypatch.setattr(cli, "_cmd_version", both)
    with pytest.raises(BaseExceptionGroup):
        cli.main(["version"])

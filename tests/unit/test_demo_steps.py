"""The demo's step runner: a step that does not finish in its bound fails the demo
with the step's name and what it was waiting for (never a hang)."""

from __future__ import annotations

import re

import pytest
import trio

from qpc_node.demo import DemoFailed, _Steps, main, until


async def test_a_step_past_its_bound_fails_with_its_name_and_wait() -> None:
    lines: list[str] = []

    async def first() -> list[str]:
        return ["detail"]

    async def stuck() -> list[str]:
        await steps.wait("a route that never comes", lambda: False)
        return []

    with trio.fail_after(10), trio.CancelScope() as scope:
        steps = _Steps(lines.append, 0.2, scope)
        await steps.run("fast", first)
        await steps.run("slow", stuck)
    assert scope.cancelled_caught
    assert steps.done == 1
    assert re.fullmatch(r"\[ *[\d.]+ s\] step 1: fast \(\d+ ms\)", lines[0]), lines
    assert lines[1] == "      detail"
    err = steps.timed_out()
    assert isinstance(err, DemoFailed)
    assert str(err) == (
        "step 2 (slow) did not finish within 0.2 s: still waiting for a route that never comes"
    )


async def test_until_is_bounded_and_takes_async_predicates() -> None:
    assert not await until(lambda: False, 0.05)
    calls = 0

    async def third_time() -> bool:
        nonlocal calls
        calls += 1
        return calls == 3

    assert await until(third_time, 5, step=0.001)
    assert calls == 3


async def test_main_stops_at_the_first_late_step_and_returns_1() -> None:
    """Through the entry point ``qpc demo`` calls: real nodes, a bound no node start
    can meet; the demo unwinds (nodes stopped, temp dir removed) and returns 1."""
    out: list[str] = []
    with trio.fail_after(30):
        assert await main(None, out.append, 0.001) == 1
    assert out[-1] == "qpc demo: FAILED: step 1 (nodes up) did not finish within 0.001 s"
    data = out[0].rsplit("; data ", 1)[1]
    assert not await trio.Path(data).exists()


async def test_a_port_taken_before_a_node_binds_it_fails_the_demo_cleanly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Static peers need the ports before the nodes start, so another program can take
    one in between: the demo says so and returns 1 instead of a traceback."""
    import socket

    from qpc_node import demo

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        monkeypatch.setattr(demo, "free_udp_port", lambda: held.getsockname()[1])
        out: list[str] = []
        with trio.fail_after(30):
            assert await main(None, out.append, 30) == 1
    assert out[-1].startswith("qpc demo: FAILED: step 1 (nodes up): could not listen on ")
    assert "run the demo again" in out[-1]

"""What the relay kill -9 tests share: kill the relay mid-way, restart it, wait for
everything, and check each message arrived exactly once.

Used in-process on loopback (test_federation_kill9.py: a federation-only relay
process) and in network namespaces with real ``qpc node`` processes
(tests/mesh/test_relay_kill9_netns.py). Each test says how to count deliveries and
how to kill and restart its relay; the sequence and the verdict are here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from tests.integration.fed_nodes import until


@dataclass(frozen=True, slots=True)
class KillRun:
    at_kill: int  # delivered when the relay was killed
    total: int  # delivered in the end


async def kill_mid_way(
    n: int,
    delivered: Callable[[], Awaitable[int]],
    kill: Callable[[], Awaitable[None]],
    restart: Callable[[], Awaitable[None]],
    *,
    within: float = 90.0,
) -> KillRun:
    """Once a quarter of ``n`` arrived (and not all): ``kill`` -9 the relay, count what
    arrived by then, ``restart`` it, and wait (bounded) until ``n`` arrived."""

    async def mid_way() -> bool:
        return await delivered() >= n // 4

    await until(mid_way, within=within, step=0.05)
    await kill()
    at_kill = await delivered()
    assert at_kill < n, "everything arrived before the kill: nothing was tested mid-way"
    await restart()

    async def all_there() -> bool:
        return await delivered() >= n

    await until(all_there, within=within, step=0.2)
    return KillRun(at_kill, await delivered())


def assert_exactly_once(got: Iterable[bytes], sent: Iterable[bytes]) -> None:
    """Every sent id arrived, none twice, nothing else."""
    counts = Counter(got)
    twice = {m.hex(): c for m, c in counts.items() if c > 1}
    want = set(sent)
    missing = want - counts.keys()
    extra = counts.keys() - want
    assert not twice, f"{len(twice)} delivered more than once: {list(twice.items())[:5]}"
    assert not missing, f"{len(missing)} of {len(want)} never delivered"
    assert not extra, f"{len(extra)} delivered that were never sent"

"""Drive harnesses with the seeded mutation engine; collect counts and crashes.

A crash is anything a target raises that is not in its ``allowed`` types, an
``Invariant`` it raises on purpose, or an async target still running after
``hang_s`` seconds. Every crash keeps its exact input so it can become a
regression test (``Crash.data``).
"""

from __future__ import annotations

import hashlib
import inspect
import random
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from tests.fuzz.mutate import generate
from tests.fuzz.registry import Harness, Invariant, Target, harnesses

HANG_S = 10.0
"""An async input running longer than this is reported as a hang (generous: shared CI)."""


@dataclass(frozen=True, slots=True)
class Crash:
    harness: str
    data: bytes
    error: str
    traceback: str

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.data).hexdigest()[:16]


@dataclass(slots=True)
class HarnessResult:
    name: str
    inputs: int = 0
    seeds: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    crashes: list[Crash] = field(default_factory=list)


async def execute(h: Harness, target: Target, data: bytes, result: HarnessResult) -> None:
    """Run one input and classify its outcome into ``result``."""
    result.inputs += 1
    try:
        with trio.move_on_after(HANG_S) as scope:
            out: Any = target(data)
            if inspect.isawaitable(out):
                out = await out
        if scope.cancelled_caught:
            _crash(result, h, data, f"Hang: still running after {HANG_S} s", "")
            return
        result.outcomes[out if isinstance(out, str) else "accepted"] += 1
    except Invariant as exc:
        _crash(result, h, data, f"Invariant: {exc}", traceback.format_exc())
    except h.allowed as exc:
        result.outcomes[type(exc).__name__] += 1
    except Exception as exc:
        _crash(result, h, data, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def execute_sync(h: Harness, target: Target, data: bytes, result: HarnessResult) -> None:
    """``execute`` for a plain function, without an event loop (atheris' fast path)."""
    result.inputs += 1
    try:
        out = target(data)
        result.outcomes[out if isinstance(out, str) else "accepted"] += 1
    except Invariant as exc:
        _crash(result, h, data, f"Invariant: {exc}", traceback.format_exc())
    except h.allowed as exc:
        result.outcomes[type(exc).__name__] += 1
    except Exception as exc:
        _crash(result, h, data, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def _crash(result: HarnessResult, h: Harness, data: bytes, error: str, tb: str) -> None:
    result.crashes.append(Crash(h.name, data, error[:500], tb))


@dataclass(frozen=True, slots=True)
class Opened:
    """A harness ready to run: its target, its seeds and its environment."""

    harness: Harness
    target: Target
    seeds: list[bytes]
    env: Any


class Session:
    """Opens the environments the chosen harnesses need, once, for a whole run."""

    def __init__(self, names: Iterable[str], workdir: Path) -> None:
        table = harnesses()
        unknown = [n for n in names if n not in table]
        if unknown:
            raise KeyError(f"unknown harnesses: {unknown}")
        self.harnesses = [table[n] for n in names]
        self._workdir = workdir
        self._stack = AsyncExitStack()
        self.opened: dict[str, Opened] = {}

    async def __aenter__(self) -> Session:
        from tests.fuzz.registry import ENVIRONMENTS

        envs: dict[str, Any] = {}
        for h in self.harnesses:
            if h.env is not None and h.env not in envs:
                d = self._workdir / f"env-{h.env}"
                d.mkdir(parents=True, exist_ok=True)
                envs[h.env] = await self._stack.enter_async_context(ENVIRONMENTS[h.env](d))
        for h in self.harnesses:
            env = envs.get(h.env) if h.env else None
            seeds = h.seeds(env)
            if not seeds:
                raise ValueError(f"harness {h.name} has no seeds")
            self.opened[h.name] = Opened(h, h.target(env), seeds, env)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def finish(self, name: str, result: HarnessResult) -> None:
        o = self.opened[name]
        if o.harness.finish is None:
            return
        try:
            await o.harness.finish(o.env)
        except Invariant as exc:
            _crash(result, o.harness, b"", f"Invariant after run: {exc}", traceback.format_exc())


async def run_harness(
    session: Session, name: str, count: int, *, seed: int, seconds: float
) -> HarnessResult:
    """Up to ``count`` inputs (every seed once, then mutants) within ``seconds``."""
    o = session.opened[name]
    result = HarnessResult(name, seeds=len(o.seeds))
    rng = random.Random(f"{seed}:{name}")
    start = time.monotonic()
    stop = start + seconds
    for i in range(count):
        if i % 32 == 0:
            if time.monotonic() > stop:
                break
            await trio.lowlevel.checkpoint()
        data = o.seeds[i] if i < len(o.seeds) else generate(rng, o.seeds)
        await execute(o.harness, o.target, data, result)
    await session.finish(name, result)
    result.seconds = time.monotonic() - start
    return result


async def run_many(
    counts: Mapping[str, int], *, seed: int, seconds_each: float, workdir: Path
) -> list[HarnessResult]:
    async with Session(counts, workdir) as session:
        return [
            await run_harness(session, name, n, seed=seed, seconds=seconds_each)
            for name, n in counts.items()
        ]


def save_crashes(results: Iterable[HarnessResult], out: Path) -> list[Path]:
    """Write each crashing input to ``out/crash-<harness>-<sha1>`` (the reproducer)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in results:
        for c in r.crashes:
            p = out / f"crash-{c.harness}-{c.digest}"
            p.write_bytes(c.data)
            (out / f"{p.name}.txt").write_text(f"{c.error}\n\n{c.traceback}")
            paths.append(p)
    return paths

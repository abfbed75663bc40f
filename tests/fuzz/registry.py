"""The harness table: name -> (seed corpus builder, target, allowed exception types).

A new decoder is one registration. For a pure function (the mesh decoders
when they land: inventories, announcements, channel messages)::

    pure(
        "mesh.inventory",
        seeds=lambda: [Inventory(...).encode(), ...],
        target=Inventory.decode,
        allowed=(RemoteProtocolError,),
    )

Targets that need state (a store, an RPC server, an MLS identity) name an
*environment*: an async context manager registered once with ``environment``
and opened once per run; the harness's ``seeds`` and ``target`` builders get
it. A target may be sync or async; whatever it raises that is not an
``allowed`` type is a crash, and so is an ``Invariant`` it raises on purpose
(a well-formedness check that failed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Target = Callable[[bytes], Awaitable[object] | object]
EnvFactory = Callable[[Path], AbstractAsyncContextManager[Any]]


class Invariant(AssertionError):
    """A target's own check failed (e.g. a malformed response): always a crash."""


@dataclass(frozen=True, slots=True)
class Harness:
    name: str
    seeds: Callable[[Any], list[bytes]]
    """Builds the valid seed corpus (given the environment, or None)."""
    target: Callable[[Any], Target]
    """Builds the function under test (given the environment, or None)."""
    allowed: tuple[type[BaseException], ...]
    env: str | None = None
    cost: float = 1.0
    """Relative cost of one input; run budgets divide by it."""
    finish: Callable[[Any], Awaitable[None]] | None = None
    """Checked after a run (e.g. server statistics bounded); raises Invariant."""


HARNESSES: dict[str, Harness] = {}
ENVIRONMENTS: dict[str, EnvFactory] = {}


def register(
    name: str,
    *,
    seeds: Callable[[Any], list[bytes]],
    target: Callable[[Any], Target],
    allowed: tuple[type[BaseException], ...],
    env: str | None = None,
    cost: float = 1.0,
    finish: Callable[[Any], Awaitable[None]] | None = None,
) -> None:
    if name in HARNESSES:
        raise ValueError(f"harness {name!r} registered twice")
    if env is not None and env not in ENVIRONMENTS:
        raise ValueError(f"harness {name!r}: unknown environment {env!r}")
    HARNESSES[name] = Harness(name, seeds, target, allowed, env, cost, finish)


def pure(
    name: str,
    *,
    seeds: Callable[[], list[bytes]],
    target: Callable[[bytes], object],
    allowed: tuple[type[BaseException], ...],
    cost: float = 1.0,
) -> None:
    """Register a stateless decoder: the common case, one call."""
    register(
        name,
        seeds=lambda _env: seeds(),
        target=lambda _env: target,
        allowed=allowed,
        cost=cost,
    )


def environment(name: str) -> Callable[[EnvFactory], EnvFactory]:
    """Decorator for an ``asynccontextmanager`` taking a private tmp dir."""

    def deco(factory: EnvFactory) -> EnvFactory:
        if name in ENVIRONMENTS:
            raise ValueError(f"environment {name!r} registered twice")
        ENVIRONMENTS[name] = factory
        return factory

    return deco


def harnesses() -> dict[str, Harness]:
    """Every registered harness (importing the target modules registers them)."""
    from tests.fuzz import targets  # noqa: F401  (registration side effect)

    return HARNESSES

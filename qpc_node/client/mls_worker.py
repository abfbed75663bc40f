"""Runs a user's MLS calls off the Trio thread, one at a time.

In ``qpc`` the node and the REPL share a process: a burst of key-package
generation (or the fsync of the MLS state after each call) must not stall the
node's QUIC timers, so every MLS call goes to a worker thread (the Rust core
releases the GIL). One at a time per identity: the calls share one state file
and their order matters (a commit before the message that follows it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import trio

P = ParamSpec("P")
T = TypeVar("T")


class MlsWorker:
    """``await worker(fn, *args)``: ``fn(*args)`` on the identity's worker thread."""

    def __init__(self, *, in_thread: bool = True) -> None:
        """``in_thread=False`` runs the calls on the Trio thread, as before issue 10:
        only for ``bench/agent_stall_bench.py`` to measure what the worker thread saves."""
        self._limiter = trio.CapacityLimiter(1)
        self._in_thread = in_thread
        self._first: Callable[[], None] | None = None

    def before_first_call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker before the first call (recovery of the MLS state
        after a restart, qpc_node/client/branches.py: nothing may see it before)."""
        self._first = fn

    async def __call__(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        call = functools.partial(fn, *args, **kwargs)
        if self._first is not None:
            call = functools.partial(_after, self._first, call)
            self._first = None
        if not self._in_thread:
            return call()
        return await trio.to_thread.run_sync(call, limiter=self._limiter)


def _after(first: Callable[[], None], call: Callable[[], T]) -> T:
    first()
    return call()

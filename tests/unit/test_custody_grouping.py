"""Custody's store calls of one kind share a commit when they arrive while the store
is busy (federation/custody.py, ``_Grouped``): fewer fsyncs for relay traffic, each
caller still answered with its own result after the commit."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from qpc_node.errors import QpcError
from qpc_node.federation.custody import _accept_many, _Grouped
from qpc_node.store import Envelope, Store
from qpc_node.store.async_store import AsyncStore
from qpc_node.store.federation import AcceptCall, RelayItem, RelayQueueLimits, relay_hops

NOW = 1_800_000_000_000
HERE, HOP = b"\xaa" * 32, b"\xbb" * 32
LIMITS = RelayQueueLimits(max_per_hop=10, max_per_source=10, max_per_origin=10)


def item(n: int) -> RelayItem:
    env = Envelope(n.to_bytes(16, "big"), os.urandom(32), NOW + 3_600_000, 8, b"x" * 32)
    return RelayItem(HOP, HERE, env, None)


async def busy(store: AsyncStore, gate: threading.Event, nursery: trio.Nursery) -> None:
    """Occupy the store worker until ``gate`` is set (a long commit elsewhere)."""
    nursery.start_soon(store.run, lambda _s: gate.wait(10))
    await trio.testing.wait_all_tasks_blocked()


async def test_calls_arriving_while_the_store_is_busy_share_one_job(tmp_path: Path) -> None:
    store = await AsyncStore.open(tmp_path / "node.db")
    group = _Grouped(store, _accept_many, "relay accept")
    gate = threading.Event()
    got: dict[int, list[str]] = {}

    async def accept(k: int, items: list[RelayItem]) -> None:
        got[k] = list(await group.call((AcceptCall(items, NOW), LIMITS)))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(group.serve)
            await trio.testing.wait_all_tasks_blocked()
            await busy(store, gate, nursery)
            async with trio.open_nursery() as calls:
                # Call 0 becomes a job of its own, queued behind the busy worker; calls 1
                # and 2 arrive meanwhile and share the next one.
                calls.start_soon(accept, 0, [item(1), item(2)])
                await trio.testing.wait_all_tasks_blocked()
                calls.start_soon(accept, 1, [item(2), item(3)])  # 2: a duplicate of call 0
                calls.start_soon(accept, 2, [item(4)])
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
            nursery.cancel_scope.cancel()
        assert got == {
            0: ["queued", "queued"],
            1: ["duplicate", "queued"],
            2: ["queued"],
        }
        assert (group.calls, group.jobs) == (3, 2)
        assert await store.run(relay_hops) == {HOP: 4}
    finally:
        gate.set()
        await store.aclose()


async def test_a_store_error_fails_its_group_and_the_next_group_runs(tmp_path: Path) -> None:
    store = await AsyncStore.open(tmp_path / "node.db")
    fail = [True]

    def run_many(s: Store, args: list[int]) -> list[int]:
        if fail[0]:
            fail[0] = False
            raise sqlite3.OperationalError("disk I/O error")
        return [a * 2 for a in args]

    group = _Grouped(store, run_many, "test")
    gate = threading.Event()
    errors: list[BaseException] = []
    values: list[int] = []

    async def call(a: int) -> None:
        try:
            values.append(await group.call(a))
        except sqlite3.Error as exc:
            errors.append(exc)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(group.serve)
            await trio.testing.wait_all_tasks_blocked()
            await busy(store, gate, nursery)
            async with trio.open_nursery() as calls:
                calls.start_soon(call, 1)
                calls.start_soon(call, 2)
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
            assert len(errors) == 2 and values == []  # both in the failed group
            assert await group.call(3) == 6  # the server still serves
            nursery.cancel_scope.cancel()
    finally:
        gate.set()
        await store.aclose()


async def test_stopping_answers_waiting_calls_instead_of_leaving_them_hanging(
    tmp_path: Path,
) -> None:
    store = await AsyncStore.open(tmp_path / "node.db")
    group = _Grouped(store, lambda _s, args: list(args), "test")
    gate = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            server = trio.CancelScope()

            async def serve() -> None:
                with server:
                    await group.serve()

            nursery.start_soon(serve)
            await trio.testing.wait_all_tasks_blocked()
            await busy(store, gate, nursery)
            with trio.fail_after(10):
                async with trio.open_nursery() as calls:

                    async def call() -> None:
                        with pytest.raises(QpcError, match="custody stopped"):
                            await group.call(1)

                    calls.start_soon(call)
                    calls.start_soon(call)
                    await trio.testing.wait_all_tasks_blocked()
                    server.cancel()
            gate.set()
    finally:
        gate.set()
        await store.aclose()

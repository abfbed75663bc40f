"""Stage B inputs of the MLS core (issue 14): a GroupInfo a peer hands us to rejoin by
external commit, and messages read against a retained snapshot or previewed. Each must
end in a typed MlsError; the read-only paths must leave the store as it was."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from qpc_node import crypto
from tests.fuzz.registry import Invariant, environment, register


@dataclass(slots=True)
class ForkEnv:
    bob: crypto.Identity
    group_b: crypto.Group
    snap: int
    outsider: crypto.Identity
    seeds_messages: list[bytes]
    seeds_group_info: list[bytes]


@environment("mls_fork")
@contextlib.asynccontextmanager
async def fork_env(tmp: Path) -> AsyncIterator[ForkEnv]:
    alice, bob, outsider = (
        crypto.Identity.create(tmp / n, os.urandom(32), durable=False) for n in "abx"
    )
    ga = alice.create_group(b"fork")
    _c, welcome = ga.add([bob.key_package()])
    ga.merge_pending_commit()
    gb = bob.join(welcome)
    snap = bob.snapshot(b"fork")
    early = ga.encrypt(b"epoch 1 " * 8)
    update = ga.update()
    ga.merge_pending_commit()
    yield ForkEnv(
        bob,
        gb,
        snap,
        outsider,
        [early, update, ga.encrypt(b"")],
        [ga.group_info(), gb.group_info()],
    )


def _readonly(env: ForkEnv) -> Callable[[bytes], object]:
    def target(data: bytes) -> object:
        before = env.bob.storage_stats()["bytes_written"]
        try:
            return env.bob.process_readonly(b"fork", env.snap, data)
        finally:
            if env.bob.storage_stats()["bytes_written"] != before:
                raise Invariant("process_readonly wrote to the store")

    return target


def _preview(env: ForkEnv) -> Callable[[bytes], object]:
    def target(data: bytes) -> object:
        epoch = env.group_b.epoch
        try:
            return env.group_b.preview(data)
        finally:
            if env.group_b.epoch != epoch:
                raise Invariant("preview changed the epoch")

    return target


register(
    "mls.process_readonly",
    env="mls_fork",
    seeds=lambda env: env.seeds_messages,
    target=_readonly,
    allowed=(crypto.MlsError,),
)
register(
    "mls.preview",
    env="mls_fork",
    seeds=lambda env: env.seeds_messages,
    target=_preview,
    allowed=(crypto.MlsError,),
)
register(
    "mls.join_external",
    env="mls_fork",
    seeds=lambda env: env.seeds_group_info,
    target=lambda env: env.outsider.join_external,
    allowed=(crypto.MlsError,),
    cost=2.0,
)

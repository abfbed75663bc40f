"""Buffered audit trail: handlers record events synchronously, one task persists them.

Batching keeps audit writes off the call path and turns many small flash writes
into one transaction per second. The buffer is bounded; if the store falls
behind, the oldest events are dropped and counted (never unbounded memory).
"""

from __future__ import annotations

from collections import deque

import msgspec
import trio

from qpc_node.store.async_store import AsyncStore
from qpc_node.store.records import AuditEvent


class AuditSink:
    def __init__(self, store: AsyncStore, *, cap: int = 4096, interval: float = 1.0) -> None:
        self._store = store
        self._buf: deque[AuditEvent] = deque()
        self._cap = cap
        self._interval = interval
        self._wake = trio.Event()
        self.written = 0
        self.dropped = 0

    def __call__(self, event: AuditEvent) -> None:
        if len(self._buf) >= self._cap:
            self._buf.popleft()
            self.dropped += 1
        self._buf.append(event)
        if len(self._buf) >= 64:
            self._wake.set()

    async def flush(self) -> None:
        if not self._buf:
            return
        batch = list(self._buf)
        self._buf.clear()
        self.written += await self._store.audit_append(batch)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self._interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self.flush()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.flush()

    def statistics(self) -> AuditStatistics:
        return AuditStatistics(buffered=len(self._buf), written=self.written, dropped=self.dropped)


class AuditStatistics(msgspec.Struct, frozen=True):
    buffered: int  # events waiting for the next flush
    written: int  # events persisted
    dropped: int  # oldest events dropped because the buffer was full

"""Channel/Publish and Channel/Fetch handlers (service/channels.py) behind a real RPC
server and SQLite store on the in-memory transport: bad input is refused typed and
counted with nothing stored; the publish rate per session holds; a parked Fetch
wakes for a channel message and for mail to the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from qpc_node.errors import StatusCode
from qpc_node.ops.clock import system_wall_ms
from qpc_node.rpc.client import RetryPolicy, RpcClient
from qpc_node.rpc.context import AnswerOverBudget, CallContext, PeerInfo, Session
from qpc_node.rpc.errors import RpcError
from qpc_node.rpc.inmemory import MemoryConnection
from qpc_node.rpc.methods import MethodTable
from qpc_node.rpc.server import RpcServer
from qpc_node.service.audit import AuditSink
from qpc_node.service.channels import ANSWER_OVERHEAD, MESSAGE_OVERHEAD, ChannelService
from qpc_node.service.delivery import Waiters
from qpc_node.service.guard import Guard
from qpc_node.service.ratelimit import TokenBucketLimiter
from qpc_node.store import AsyncStore
from qpc_node.store.channels import ChannelLimits, ChannelStore
from qpc_node.wire.channel import ChannelMessage
from qpc_node.wire.gen.qpc.v1 import channel_pb2, rpc_pb2

ALICE = b"\x0a" * 32
CH = b"\xcc" * 32
PUB, FETCH = "qpc.v1.Channel/Publish", "qpc.v1.Channel/Fetch"


@dataclass(slots=True)
class Env:
    store: ChannelStore
    service: ChannelService
    mail: Waiters
    server: RpcServer
    nursery: trio.Nursery

    def client(self, user: bytes | None = ALICE) -> RpcClient:
        conn = MemoryConnection(self.server, self.nursery, PeerInfo("t", ("10.0.0.1", 1)))
        conn.state.session.user = user
        return RpcClient(conn.open_stream, retry_policy=RetryPolicy(max_attempts=1))


@asynccontextmanager
async def channel_node(tmp: Path, *, publish_rate: float = 1e9) -> AsyncIterator[Env]:
    store = await AsyncStore.open(tmp / "node.db", synchronous="OFF")
    try:
        async with trio.open_nursery() as nursery:
            audit = AuditSink(store)
            await nursery.start(audit.run)

            def big() -> TokenBucketLimiter[str]:
                return TokenBucketLimiter[str](rate=1e9, burst=1e9)

            guard = Guard(per_ip=big(), per_identity=big(), audit=audit, wall_ms=system_wall_ms)
            channels = ChannelStore(store, ChannelLimits())
            mail = Waiters()
            service = ChannelService(
                channels,
                guard,
                wall_ms=system_wall_ms,
                limiter=TokenBucketLimiter[str](rate=publish_rate, burst=max(1.0, publish_rate)),
                mail=mail,
            )
            table = MethodTable()
            service.register(table)
            yield Env(channels, service, mail, RpcServer(table), nursery)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


def good(n: int = 1, **kw: object) -> channel_pb2.ChannelMessage:
    m = ChannelMessage(CH, n.to_bytes(16, "big"), system_wall_ms() + 3_600_000, 8, bytes(64))
    pb = m.to_proto()
    for k, v in kw.items():
        setattr(pb, k, v)
    return pb


async def publish(
    c: RpcClient, m: channel_pb2.ChannelMessage
) -> channel_pb2.ChannelPublishResponse:
    return await c.call(
        PUB, channel_pb2.ChannelPublishRequest(message=m), channel_pb2.ChannelPublishResponse
    )


async def fetch(c: RpcClient, **kw: object) -> channel_pb2.ChannelFetchResponse:
    req = channel_pb2.ChannelFetchRequest(**kw)  # type: ignore[arg-type]
    return await c.call(FETCH, req, channel_pb2.ChannelFetchResponse, timeout=30)


@pytest.mark.parametrize(
    ("fields", "status", "counter"),
    [
        ({"hop_limit": 17}, rpc_pb2.STATUS_CODE_INVALID_ARGUMENT, "refused_hop_limit"),
        ({"expiry_ms": 1}, rpc_pb2.STATUS_CODE_INVALID_ARGUMENT, "refused_expired"),
        ({"expiry_ms": 2**63}, rpc_pb2.STATUS_CODE_INVALID_ARGUMENT, "refused_expiry_too_far"),
        ({"channel_id": b""}, rpc_pb2.STATUS_CODE_INVALID_ARGUMENT, "refused_malformed"),
        ({"sealed": b""}, rpc_pb2.STATUS_CODE_INVALID_ARGUMENT, "refused_malformed"),
        ({"sealed": bytes(20_000)}, rpc_pb2.STATUS_CODE_PAYLOAD_TOO_LARGE, "refused_too_large"),
    ],
)
async def test_bad_publish_is_typed_counted_and_not_stored(
    tmp_path: Path, fields: dict[str, object], status: int, counter: str
) -> None:
    async with channel_node(tmp_path) as env:
        resp = await publish(env.client(), good(**fields))
        assert (resp.status, resp.seq, resp.duplicate) == (status, 0, False)
        assert resp.detail
        assert getattr(env.store.statistics(), counter) == 1
        assert env.service.statistics().refused == 1
        t = await env.store.totals()
        assert (t.messages, t.tombstones) == (0, 0)


async def test_publish_needs_a_session_and_keeps_to_its_rate(tmp_path: Path) -> None:
    async with channel_node(tmp_path, publish_rate=0.001) as env:  # burst 1, no refill
        with pytest.raises(RpcError) as info:
            await publish(env.client(None), good())
        assert info.value.code == StatusCode.UNAUTHENTICATED
        c = env.client()
        assert (await publish(c, good(1))).status == 0
        with pytest.raises(RpcError) as info:
            await publish(c, good(2))
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert env.service.statistics().rate_limited == 1
        assert (await env.store.totals()).messages == 1
        # Another session has its own budget.
        assert (await publish(env.client(b"\x0b" * 32), good(3))).status == 0


@pytest.mark.parametrize(
    ("cursors", "why"),
    [
        ([], "no channel"),
        ([channel_pb2.ChannelCursor(channel_id=bytes([i]) * 32) for i in range(65)], "65"),
        ([channel_pb2.ChannelCursor(channel_id=b"\x01" * 33)], "long id"),
    ],
)
async def test_bad_fetch_is_typed(
    tmp_path: Path, cursors: list[channel_pb2.ChannelCursor], why: str
) -> None:
    async with channel_node(tmp_path) as env:
        with pytest.raises(RpcError) as info:
            await fetch(env.client(), cursors=cursors)
        assert info.value.code == StatusCode.INVALID_ARGUMENT, why


async def test_fetch_pages_and_dedupes(tmp_path: Path) -> None:
    async with channel_node(tmp_path) as env:
        c = env.client()
        for n in range(1, 6):
            assert not (await publish(c, good(n))).duplicate
        again = await publish(c, good(3))
        assert again.duplicate and again.seq == 3
        page = await fetch(c, cursors=[channel_pb2.ChannelCursor(channel_id=CH)], limit=3)
        assert [m.seq for m in page.messages] == [1, 2, 3] and page.more
        rest = await fetch(c, cursors=[channel_pb2.ChannelCursor(channel_id=CH, after_seq=3)])
        assert [m.seq for m in rest.messages] == [4, 5] and not rest.more
        st = env.service.statistics()
        assert (st.published, st.duplicates) == (5, 1)


async def test_parked_fetch_wakes_for_a_message_and_for_mail(tmp_path: Path) -> None:
    async with channel_node(tmp_path) as env:
        c = env.client()
        cur = [channel_pb2.ChannelCursor(channel_id=CH)]
        got: list[channel_pb2.ChannelFetchResponse] = []
        async with trio.open_nursery() as nursery:

            async def park() -> None:
                got.append(await fetch(c, cursors=cur, wait_ms=20_000))

            nursery.start_soon(park)
            await trio.testing.wait_all_tasks_blocked(0.01)
            assert env.service.statistics().parked_fetches == 1
            start = trio.current_time()
            await publish(env.client(b"\x0b" * 32), good(1))
        assert [m.seq for m in got[0].messages] == [1]
        assert trio.current_time() - start < 10
        after = [channel_pb2.ChannelCursor(channel_id=CH, after_seq=1)]
        async with trio.open_nursery() as nursery:

            async def park_again() -> None:
                got.append(await fetch(c, cursors=after, wait_ms=20_000))

            nursery.start_soon(park_again)
            await trio.testing.wait_all_tasks_blocked(0.01)
            start = trio.current_time()
            env.mail.notify(ALICE)  # mail for the caller arrived
        assert list(got[1].messages) == [] and trio.current_time() - start < 10
        assert env.service.statistics().parked_fetches == 0
        assert len(env.mail) == 0


class TightAnswer:
    """A send budget with ``free`` bytes left: grants what it has, records holdings."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.held = 0
        self.peak = 0

    @property
    def frame_cap(self) -> int:
        return 1 << 20

    def reserve(self, nbytes: int) -> int:
        self.held = min(nbytes, self.free)
        self.peak = max(self.peak, self.held)
        return self.held

    def shrink(self, nbytes: int) -> None:
        self.held = min(self.held, max(nbytes, 0))


def ctx(answer: TightAnswer) -> CallContext:
    return CallContext(
        FETCH, 1, "", trio.current_time() + 30, PeerInfo("t", ("10.0.0.1", 1)),
        Session(user=ALICE), answer,
    )  # fmt: skip


async def test_a_fetch_answer_stays_within_what_the_send_budget_grants(tmp_path: Path) -> None:
    async with channel_node(tmp_path) as env:
        c = env.client()
        for n in range(1, 4):
            await publish(c, good(n))
        req = channel_pb2.ChannelFetchRequest(cursors=[channel_pb2.ChannelCursor(channel_id=CH)])
        one = len(good(1).SerializeToString()) + MESSAGE_OVERHEAD + ANSWER_OVERHEAD
        tight = TightAnswer(one + 10)  # room for one message, not two
        resp = await env.service.fetch(req, ctx(tight))
        assert [m.seq for m in resp.messages] == [1] and resp.more
        assert len(resp.SerializeToString()) <= tight.held <= one + 10
        with pytest.raises(AnswerOverBudget):  # not even the first fits: retriable, typed
            await env.service.fetch(req, ctx(TightAnswer(one - 40)))

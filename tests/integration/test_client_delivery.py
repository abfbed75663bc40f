"""Issue 10, the client side of delivery, against a real node (QUIC, SQLite, MLS):
per-message outbox fates, messages held until their commit arrives, KeyPackage
rotation and exhaustion, and MLS calls kept off the Trio thread."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytest
import trio
import trio.testing
from node_harness import accept, flush_inbox, mailbox_ids, running_node, texts, users

from qpc_node import crypto
from qpc_node.client.agent import KP_ROTATE_MS, KP_TARGET, Agent, Sent
from qpc_node.client.fingerprint import short_code
from qpc_node.client.inbox import DESCRIBE_WAIT_MS
from qpc_node.errors import StatusCode
from qpc_node.ops.clock import ManualWallClock
from qpc_node.quic import ALPN_CLIENT, ClientTLS, open_endpoint
from qpc_node.rpc import RpcClient, RpcError
from qpc_node.wire.envelope import Envelope, pad
from qpc_node.wire.gen.qpc.v1 import client_pb2, service_pb2

pytestmark = pytest.mark.timeout(180)
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MAILBOX_MAX = 6


def _gid(agent: Agent, name: str) -> bytes:
    conv = agent._st.conversation(name)
    assert conv is not None
    return conv.group_id


async def _fill_mailbox(sender: Agent, recipient: Agent, wall: ManualWallClock) -> None:
    """Enqueue junk for ``recipient`` until its mailbox quota refuses one."""
    for _ in range(MAILBOX_MAX + 1):
        env = Envelope(os.urandom(16), recipient.me, wall() + DAY_MS, 4, os.urandom(256))
        resp = await sender._rpc.call(
            "qpc.v1.Delivery/Enqueue",
            service_pb2.EnqueueRequest(envelopes=[env.to_proto()]),
            service_pb2.EnqueueResponse,
        )
        if resp.results[0].status == StatusCode.RESOURCE_EXHAUSTED:
            return
    raise AssertionError("the mailbox never filled up")


async def accepted_by(a: Agent, *members: Agent, wall: ManualWallClock) -> None:
    """Each member writes to ``a`` first, so ``a`` is their contact (mailbox fairness).

    A 6-message mailbox leaves strangers one message in all: ``a`` reads (acks) each
    member's note before the next one comes, so its stranger pool is free again."""
    for member in members:
        await accept(member, a, wall)
        await texts(a, 0, wait=0.2)


async def test_outbox_settles_each_message_of_a_mixed_batch(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """One flush carries a message for a local member, one for a member whose mailbox
    is full and one for a stranger: delivered, retried later, dropped with a warning."""
    limits = {"mailbox_max_messages": str(MAILBOX_MAX)}
    async with (
        running_node(tmp_path, wall, limits=limits) as (_, info),
        users(tmp_path, info, wall, "a", "b", "c") as (a, b, c),
    ):
        await accepted_by(a, b, c, wall=wall)
        await a.group_create("team")
        await a.group_invite("team", b.ident.fingerprint)
        await a.group_invite("team", c.ident.fingerprint)
        await texts(b, 0, wait=0.5)
        await texts(c, 0, wait=0.5)
        assert sorted(await c.group_members("team")) == sorted(await a.group_members("team"))

        await _fill_mailbox(a, c, wall)
        stranger = b"\x07" * 32
        lost = a._envelope(stranger, client_pb2.Sealed.MLS_MESSAGE, b"g", b"for nobody here")
        await a._state.call(a._st.outbox_add, lost.msg_id, lost.encode(), wall())
        await a.group_send("team", "hello both")  # flushes the stranger's message too

        assert [m.text for m in await texts(b, 1)] == ["hello both"]
        assert (a.stats.send_dropped, a.stats.send_retries) == (1, 1)
        assert f"to {short_code(stranger.hex())} was not delivered" in a.stats.warnings[-1]
        assert "not homed here" in a.stats.warnings[-1]
        assert await a._state.call(a._st.outbox_len) == 1  # c's copy waits for room

        # c drains its mailbox (the junk is unreadable: counted, not shown) ...
        assert await texts(c, 1, wait=1.5) == []
        assert c.stats.undecryptable >= MAILBOX_MAX - 2
        # ... and a's retry, once its backoff passed, delivers c's copy exactly once.
        wall.advance(120_000)
        assert await a.flush_outbox() == 0
        assert [m.text for m in await texts(c, 1)] == ["hello both"]
        assert await texts(b, 1, wait=0.5) == []
        assert a.stats.send_dropped == 1


async def test_whole_call_failure_keeps_every_message(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """A call refused as a whole (here: a connection that has not authenticated yet)
    keeps every message queued; after authenticating, one flush delivers them all."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
        open_endpoint("127.0.0.1", 0) as ep,
    ):
        conn = await ep.connect(
            info.host, info.port, ClientTLS(ALPN_CLIENT, pin=info.cert_fingerprint)
        )
        fresh = Agent(
            a.ident,
            a._state,
            RpcClient(conn.open_stream),
            node_cert_fingerprint=bytes.fromhex(info.cert_fingerprint),
            wall_ms=wall,
        )
        envs = [
            fresh._envelope(b.me, client_pb2.Sealed.MLS_MESSAGE, b"g", bytes([i])) for i in range(3)
        ]
        await fresh._state.call(
            fresh._st.outbox_add_many, [(e.msg_id, e.encode()) for e in envs], wall()
        )
        with pytest.raises(RpcError) as ei:
            await fresh.flush_outbox()
        assert ei.value.code == StatusCode.UNAUTHENTICATED
        assert (fresh.stats.send_dropped, fresh.stats.send_retries) == (0, 3)
        assert await fresh._state.call(fresh._st.outbox_len) == 3

        await fresh.authenticate()
        wall.advance(10_000)
        assert await fresh.flush_outbox() == 0
        assert await mailbox_ids(b) == [e.msg_id for e in envs]
        await conn.aclose()


def _merge(g: crypto.Group) -> None:
    """Apply a commit we made by hand (a no-op with a core that merges at once)."""
    merge = getattr(g, "merge_pending_commit", None)
    if merge is not None:
        merge()


async def test_message_from_the_next_epoch_waits_for_its_commit(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """b gets a text of epoch n+1 before the commit to n+1, and the client restarts in
    between: the text is held in client.db (not acked away), shown once the commit
    arrives, and never shown twice."""
    async with running_node(tmp_path, wall) as (_, info):
        async with users(tmp_path, info, wall, "a", "b") as (a, b):
            await a.group_create("team")
            await a.group_invite("team", b.ident.fingerprint)
            await a.group_send("team", "epoch one")
            assert [m.text for m in await texts(b, 1)] == ["epoch one"]
            assert [r.text for r in await b.unshown()] == ["epoch one"]

            gid = _gid(a, "team")
            g = a.ident.group(gid)
            commit = g.update()
            _merge(g)
            early = client_pb2.AppMessage(text="from the next epoch").SerializeToString()
            kind = client_pb2.Sealed.MLS_MESSAGE
            text_env = a._envelope(b.me, kind, gid, g.encrypt(early))
            commit_env = a._envelope(b.me, kind, gid, commit)
            fates = await a._submit([text_env])
            assert fates == {text_env.msg_id: Sent.DELIVERED}

            assert await texts(b, 1, wait=1.0) == []
            assert (b.stats.held, b.stats.undecryptable) == (1, 0)
            assert await mailbox_ids(b) == []  # acked: client.db holds it now
        # Both agents restart; the commit arrives only now.
        async with users(tmp_path, info, wall, "a", "b") as (a, b):
            await a._submit([commit_env])
            got = await texts(b, 1)
            assert [(m.text, m.conversation) for m in got] == [("from the next epoch", "team")]
            assert (b.stats.held, b.stats.recovered, b.stats.undecryptable) == (0, 1, 0)
            assert [r.text for r in await b.unshown()] == ["from the next epoch"]
            await a.group_send("team", "and after")
            assert [m.text for m in await texts(b, 1)] == ["and after"]
            assert [r.text for r in await b.unshown()] == ["and after"]


async def test_message_before_its_welcome_is_held_and_invalid_ones_are_reported(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        kp = await a._fetch_key_package(b.me)
        g = a.ident.create_group()
        _commit, welcome = g.add([kp])
        _merge(g)
        gid = bytes(g.group_id)
        hello = client_pb2.AppMessage(text="before the welcome").SerializeToString()
        kind = client_pb2.Sealed.MLS_MESSAGE
        junk = client_pb2.Sealed(kind=kind, group_id=gid, data=b"\x00\x01\x00\x02" + b"x" * 40)
        bad = Envelope(os.urandom(16), b.me, wall() + DAY_MS, 4, pad(junk.SerializeToString()))
        await a._submit(
            [
                a._envelope(b.me, kind, gid, g.encrypt(hello)),
                a._envelope(b.me, client_pb2.Sealed.WELCOME, gid, welcome),
                bad,
            ]
        )
        # No GroupInfo follows (a bare sender): the text waits for one, then is
        # shown under the placeholder name.
        assert await texts(b, 1, wait=1.0) == []
        assert (b.stats.held, b.stats.undecryptable) == (1, 1)
        wall.advance(DESCRIBE_WAIT_MS)
        got = await texts(b, 1)
        assert [m.text for m in got] == ["before the welcome"]
        assert got[0].conversation.startswith("pending-")
        assert (b.stats.held, b.stats.recovered, b.stats.undecryptable) == (0, 1, 1)
        assert "could not be read and was dropped" in b.stats.warnings[-1]


async def test_text_that_overtakes_the_group_info_waits_for_the_group_name(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """Relays reorder envelopes (a relay window of several batches, retries): a text
    sent after the GroupInfo follow-up can reach the joiner first. It is held until
    the follow-up names the group, then shown there, not under a placeholder (before:
    shown as "pending-<gid>", and "/group send team" failed: the five-node netns
    test)."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        kp = await a._fetch_key_package(b.me)
        g = a.ident.create_group()
        _commit, welcome = g.add([kp])
        _merge(g)
        gid = bytes(g.group_id)
        kind = client_pb2.Sealed.MLS_MESSAGE
        named = client_pb2.AppMessage(
            info=client_pb2.GroupInfo(name="team", committer=a.me)
        ).SerializeToString()
        info_env = a._outbox.envelope(b.me, kind, gid, g.encrypt(named), describes=True)
        hello = client_pb2.AppMessage(text="after the info").SerializeToString()
        await a._submit(
            [
                a._envelope(b.me, client_pb2.Sealed.WELCOME, gid, welcome),
                a._envelope(b.me, kind, gid, g.encrypt(hello)),
            ]
        )
        assert await texts(b, 1, wait=1.0) == []
        assert b.stats.held == 1
        await a._submit([info_env])
        got = await texts(b, 1)
        assert [(m.text, m.conversation) for m in got] == [("after the info", "team")]
        assert (b.stats.held, b.stats.recovered, b.stats.undecryptable) == (0, 1, 0)


async def test_held_message_is_given_up_at_its_expiry(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        g = a.ident.create_group()
        ct = g.encrypt(client_pb2.AppMessage(text="never").SerializeToString())
        env = a._envelope(b.me, client_pb2.Sealed.MLS_MESSAGE, bytes(g.group_id), ct)
        await a._submit([env])
        assert await texts(b, 1, wait=1.0) == []
        assert b.stats.held == 1
        wall.advance(8 * DAY_MS)
        assert await b.receive() == []
        assert (b.stats.held, b.stats.held_expired) == (0, 1)
        assert "expired" in b.stats.warnings[-1]


# -- KeyPackages ----------------------------------------------------------------------


async def _count(agent: Agent) -> int:
    resp = await agent._rpc.call(
        "qpc.v1.Directory/Count",
        service_pb2.CountKeyPackagesRequest(),
        service_pb2.CountKeyPackagesResponse,
    )
    return int(resp.available)


async def _take(agent: Agent, peer: Agent) -> service_pb2.FetchKeyPackageResponse:
    return await agent._rpc.call(
        "qpc.v1.Directory/Fetch",
        service_pb2.FetchKeyPackageRequest(identity=peer.me),
        service_pb2.FetchKeyPackageResponse,
    )


async def test_key_packages_rotate_at_half_life_and_keep_a_last_resort(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        assert await _count(b) == KP_TARGET
        assert await b.top_up_key_packages() == 0  # fresh and full: nothing to do
        wall.advance(KP_ROTATE_MS - 1)
        assert await b.top_up_key_packages() == 0
        wall.advance(2)  # past half-life: a fresh pool and a fresh last resort
        assert await b.top_up_key_packages() == KP_TARGET + 1
        assert await _count(b) == 2 * KP_TARGET
        wall.advance(24 * HOUR_MS - KP_ROTATE_MS)  # the first pool expires on the node
        assert await _count(b) == KP_TARGET
        fresh = [await _take(a, b) for _ in range(KP_TARGET)]
        assert not any(r.last_resort for r in fresh)
        # Drained: the last resort is handed out, and kept for the next inviter.
        lr1, lr2 = await _take(a, b), await _take(a, b)
        assert lr1.last_resort and lr2.last_resort and lr1.key_package == lr2.key_package
        assert crypto.inspect_key_package(lr1.key_package).last_resort


async def test_invites_on_an_empty_pool_use_the_last_resort_then_top_up_refills(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        for _ in range(KP_TARGET):
            assert not (await _take(a, b)).last_resort
        assert await _count(b) == 0
        # Two groups invite b with the same last-resort package: b joins both.
        for name in ("one", "two"):
            await a.group_create(name)
            await a.group_invite(name, b.ident.fingerprint)
            await a.group_send(name, f"hi in {name}")
        got = await texts(b, 2)
        assert sorted((m.conversation, m.text) for m in got) == [
            ("one", "hi in one"),
            ("two", "hi in two"),
        ]
        await b.group_send("two", "b answers")
        assert [m.text for m in await texts(a, 1)] == ["b answers"]
        # Below low water: the top-up refills the pool (no rotation: not stale yet).
        assert await b.top_up_key_packages() == KP_TARGET
        assert await _count(b) == KP_TARGET
        assert not (await _take(a, b)).last_resort


# -- the Trio thread never runs MLS ---------------------------------------------------


@contextmanager
def mls_calls_on_this_thread() -> Iterator[list[str]]:
    """Record every method call of an MLS Identity/Group made on the calling thread.

    The Rust methods are C functions: ``sys.setprofile`` reports them as c_call events
    of this thread only, so whatever a worker thread runs is not recorded.
    """
    seen: list[str] = []
    me = threading.get_ident()

    def prof(_frame: FrameType, event: str, arg: object) -> None:
        if event == "c_call" and isinstance(
            getattr(arg, "__self__", None), (crypto.Identity, crypto.Group)
        ):
            seen.append(getattr(arg, "__name__", "?"))

    old = sys.getprofile()
    sys.setprofile(prof)
    try:
        yield seen
    finally:
        sys.setprofile(old)
        assert threading.get_ident() == me


async def test_agent_runs_mls_calls_off_the_trio_thread(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        with mls_calls_on_this_thread() as on_trio:
            wall.advance(KP_ROTATE_MS + 1)
            assert await a.top_up_key_packages() == KP_TARGET + 1
            await a.group_create("team")
            await a.group_invite("team", b.ident.fingerprint)
            await a.group_send("team", "off thread")
            assert [m.text for m in await texts(b, 1)] == ["off thread"]
            assert sorted(await b.group_members("team")) == sorted(
                [a.ident.fingerprint, b.ident.fingerprint]
            )
            await b.group_send("team", "back")
            assert [m.text for m in await texts(a, 1)] == ["back"]
        assert on_trio == []


# -- no fork from a failed send -------------------------------------------------------


async def test_refused_welcome_removes_the_joiner_again(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """Inviting someone the node refuses (not homed here): the Welcome goes out only
    after the commit merged (docs/groups.md), so the commit applies; the Welcome is
    refused for good, and a joiner who can never read the group is removed again.
    Everyone keeps talking, on one epoch."""
    stranger = crypto.Identity.create(tmp_path / "stranger", os.urandom(32), durable=False)
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "c") as (a, b, c),
    ):
        await a.group_create("team")
        await a.group_invite("team", b.ident.fingerprint)
        await a.group_send("team", "hello")
        assert [m.text for m in await texts(b, 1)] == ["hello"]
        gid = _gid(a, "team")
        epoch = a.ident.group(gid).epoch

        assert not any("queued" in w for w in a.stats.warnings)  # b's commit went at once
        conv, g = await a._conversation("team")
        await a._invite(conv, g, bytes.fromhex(stranger.fingerprint), stranger.key_package())
        g = a.ident.group(gid)
        assert (g.epoch, g.has_pending_commit()) == (epoch + 2, False), "\n".join(a.stats.warnings)
        assert stranger.fingerprint not in g.members()
        assert any("could not be welcomed" in w for w in a.stats.warnings)
        assert await a._state.call(a._st.pending_commits) == []
        assert await a._state.call(a._st.outbox_len) == 0
        assert await flush_inbox(b) == []  # the two commits
        assert b.ident.group(gid).epoch_authenticator() == g.epoch_authenticator()

        await a.group_send("team", "still one group")
        assert [m.text for m in await texts(b, 1)] == ["still one group"]
        await b.group_send("team", "and b answers")
        assert [m.text for m in await texts(a, 1)] == ["and b answers"]
        assert (b.stats.undecryptable, b.stats.held) == (0, 0)
        # The group moves on normally afterwards.
        await a.group_invite("team", c.ident.fingerprint)
        await a.group_send("team", "three now")
        assert [m.text for m in await texts(c, 1)] == ["three now"]
        assert [m.text for m in await texts(b, 1)] == ["three now"]


async def test_welcome_refused_for_now_is_delivered_after_a_restart(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """A full mailbox refuses the Welcome for now. The Welcome goes out only after the
    commit merged (docs/groups.md), so the commit applies at once (b has room) and the
    group works on the new epoch; the Welcome waits in the outbox (durably, across a
    client restart) and c joins, reading what was sent meanwhile, once the node takes it."""
    limits = {"mailbox_max_messages": str(MAILBOX_MAX)}
    async with (
        running_node(tmp_path, wall, limits=limits) as (_, info),
        users(tmp_path, info, wall, "b", "c") as (b, c),
    ):
        async with users(tmp_path, info, wall, "a") as (a,):
            await accepted_by(a, b, c, wall=wall)
            await a.group_create("team")
            await a.group_invite("team", b.ident.fingerprint)
            await texts(b, 0, wait=0.5)
            gid = _gid(a, "team")
            epoch = a.ident.group(gid).epoch

            await _fill_mailbox(a, c, wall)
            await a.group_invite("team", c.ident.fingerprint)
            g = a.ident.group(gid)
            assert (g.epoch, g.has_pending_commit()) == (epoch + 1, False)
            assert c.ident.fingerprint in g.members()
            assert await a._state.call(a._st.outbox_len) >= 1  # the Welcome waits
            await a.group_send("team", "while c waits")
            assert [m.text for m in await texts(b, 1)] == ["while c waits"]
            await b.group_send("team", "b too")
            assert [m.text for m in await texts(a, 1)] == ["b too"]
        assert await texts(c, 1, wait=1.0) == []  # c drains its mailbox (junk only)
        wall.advance(120_000)
        async with users(tmp_path, info, wall, "a") as (a,):  # its start flushes the outbox
            got_c = await texts(c, 1, wait=1.0)
            assert [m.text for m in got_c] == ["while c waits"]
            assert c._st.conversation("team") is not None  # named by the GroupInfo
            await a.group_send("team", "all three")
            assert [m.text for m in await texts(c, 1)] == ["all three"]
            assert [m.text for m in await texts(b, 1)] == ["all three"]
            assert (b.stats.undecryptable, b.stats.held, c.stats.held) == (0, 0, 0)


async def test_a_pending_commit_never_queued_is_cleared_at_start(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """A crash between making a commit and queueing it leaves MLS with a pending commit
    client.db knows nothing of: the next start clears it, the group stays usable."""
    async with running_node(tmp_path, wall) as (_, info):
        async with users(tmp_path, info, wall, "a", "b") as (a, b):
            await a.group_create("team")
            await a.group_invite("team", b.ident.fingerprint)
            await texts(b, 0, wait=0.5)
            gid = _gid(a, "team")
            g = a.ident.group(gid)
            epoch = g.epoch
            g.update()  # made, never queued: the process "crashes" here
            assert g.has_pending_commit()
        async with users(tmp_path, info, wall, "a", "b") as (a, b):
            g = a.ident.group(gid)
            assert (g.epoch, g.has_pending_commit()) == (epoch, False)
            await a.group_send("team", "after the crash")
            assert [m.text for m in await texts(b, 1)] == ["after the crash"]


async def test_submit_reports_fates_a_concurrent_flush_decided(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """A submit queues its messages, then waits for the outbox lock; a flush that was
    waiting first (the REPL's poll loop) sends them. The submit still reports each one's
    fate (before: nothing was due any more, and the fates were missing)."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        await accepted_by(a, b, wall=wall)
        envs = [
            a._envelope(b.me, client_pb2.Sealed.MLS_MESSAGE, b"g", bytes([i])) for i in range(3)
        ]
        outbox = a._outbox
        got: dict[bytes, Sent] = {}

        async def submit() -> None:
            got.update(await a._submit(envs))

        async with trio.open_nursery() as nursery, outbox._lock:
            nursery.start_soon(a.flush_outbox)  # waits for the lock first
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(submit)
            for _ in range(1000):  # until submit queued them (it then waits for the lock)
                if await a._state.call(a._st.outbox_len) == len(envs):
                    break
                await trio.sleep(0.01)
        assert {got.get(e.msg_id) for e in envs} == {Sent.DELIVERED}

"""Broadcast channels with two users on ONE node: real QUIC, SQLite and the REPL.

A broadcast from one member reaches the other through Channel/Fetch; a member's
long-poll for mail also wakes for channel messages; what the node refuses is typed
and nothing of it is stored; a user who left the channel no longer receives it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from msgspec.structs import replace
from node_harness import run_repl, running_node, texts, users
from repl_harness import start_pty_repl

from qpc_node.client.channels import channel_id, parse_secret, seal
from qpc_node.ops.clock import ManualWallClock
from qpc_node.wire.gen.qpc.v1 import channel_pb2, rpc_pb2

pytestmark = pytest.mark.timeout(120)

_SECRET = re.compile(r"qpcch:[a-z2-7]{52}")


async def test_broadcast_reaches_the_other_member(tmp_path: Path, wall: ManualWallClock) -> None:
    async with (
        running_node(tmp_path, wall) as (node, info),
        users(tmp_path, info, wall, "a", "b", "c") as (a, b, c),
    ):
        secret = await a.channel_create("news")
        await b.channel_join("town", secret)  # each member names it as it likes
        await a.broadcast("news", "the bridge is closed")
        (m,) = await texts(b, 1)
        assert (m.conversation, m.sender, m.text) == (
            "#town",
            a.ident.fingerprint,
            "the bridge is closed",
        )
        # The sender does not get its own message back as new; c, not a member, nothing.
        assert await a.receive(0) == []
        assert await c.receive(0) == []
        # Fetch again from the start: the copy already shown is not shown twice.
        await b.channel_leave("town")
        await b.channel_join("town", secret)
        assert await b.receive(0) == []
        assert b.stats.duplicates == 1
        assert node.channels is not None
        assert node.channels.statistics().stored == 1


async def test_a_parked_receive_wakes_for_a_broadcast(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """b long-polls (as the interactive REPL does); a's broadcast answers it at once."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b") as (a, b),
    ):
        secret = await a.channel_create("news")
        await b.channel_join("news", secret)
        got: list[str] = []
        async with trio.open_nursery() as nursery:

            async def listen() -> None:
                got.extend(m.text for m in await b.receive(wait=20.0))

            nursery.start_soon(listen)
            await trio.testing.wait_all_tasks_blocked(0.05)
            start = trio.current_time()
            await a.broadcast("news", "wake up")
        assert got == ["wake up"]
        assert trio.current_time() - start < 10.0  # answered by the broadcast, not the wait
        # And a DM still wakes the same long-poll (the node answers it for mail too).
        async with trio.open_nursery() as nursery:
            dm: list[str] = []

            async def listen_dm() -> None:
                dm.extend(m.text for m in await b.receive(wait=20.0))

            nursery.start_soon(listen_dm)
            await trio.testing.wait_all_tasks_blocked(0.05)
            start = trio.current_time()
            await a.dm(b.ident.fingerprint, "a dm")
        assert "a dm" in dm + [m.text for m in await texts(b, 1, wait=2.0)]
        assert trio.current_time() - start < 15.0


async def test_bad_publishes_are_refused_typed_and_nothing_is_stored(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with (
        running_node(tmp_path, wall) as (node, info),
        users(tmp_path, info, wall, "a") as (a,),
    ):
        secret = os.urandom(32)
        now = wall()

        def msg(**kw: object) -> channel_pb2.ChannelMessage:
            m = seal(secret, a.ident.public_key, a.ident.sign, "x", now_ms=now).to_proto()
            for k, v in kw.items():
                setattr(m, k, v)
            return m

        cases = {
            "expired": (msg(expiry_ms=now - 1), rpc_pb2.STATUS_CODE_INVALID_ARGUMENT),
            "too far": (
                msg(expiry_ms=now + 8 * 24 * 3600 * 1000),
                rpc_pb2.STATUS_CODE_INVALID_ARGUMENT,
            ),
            "hop limit": (msg(hop_limit=65), rpc_pb2.STATUS_CODE_INVALID_ARGUMENT),
            "short id": (msg(msg_id=b"\x01" * 15), rpc_pb2.STATUS_CODE_INVALID_ARGUMENT),
            "bad channel": (msg(channel_id=b"\x01" * 31), rpc_pb2.STATUS_CODE_INVALID_ARGUMENT),
            "oversized": (msg(sealed=b"\x00" * 17_000), rpc_pb2.STATUS_CODE_PAYLOAD_TOO_LARGE),
        }
        for what, (m, status) in cases.items():
            resp = await a._rpc.call(
                "qpc.v1.Channel/Publish",
                channel_pb2.ChannelPublishRequest(message=m),
                channel_pb2.ChannelPublishResponse,
            )
            assert (resp.status, resp.seq) == (status, 0), what
            assert resp.detail, what
        assert node.channels is not None
        st = node.channels.statistics()
        assert (st.refused_expired, st.refused_expiry_too_far, st.refused_hop_limit) == (1, 1, 1)
        assert (st.refused_malformed, st.refused_too_large, st.stored) == (2, 1, 0)
        totals = await node.channels.totals()
        assert (totals.messages, totals.tombstones) == (0, 0)
        # A good one is stored, and publishing it again is a duplicate with the same seq.
        good = msg()
        first, again = [
            await a._rpc.call(
                "qpc.v1.Channel/Publish",
                channel_pb2.ChannelPublishRequest(message=good),
                channel_pb2.ChannelPublishResponse,
            )
            for _ in range(2)
        ]
        assert (first.status, first.duplicate, again.duplicate) == (0, False, True)
        assert first.seq == again.seq > 0
        page = await a._rpc.call(
            "qpc.v1.Channel/Fetch",
            channel_pb2.ChannelFetchRequest(
                cursors=[channel_pb2.ChannelCursor(channel_id=channel_id(secret))]
            ),
            channel_pb2.ChannelFetchResponse,
        )
        assert [bytes(x.message.msg_id) for x in page.messages] == [bytes(good.msg_id)]


async def test_repl_broadcast_reaches_the_other_repl(tmp_path: Path, wall: ManualWallClock) -> None:
    """``qpc repl`` processes: /channel create, /channel join, /mesh broadcast, /inbox."""
    async with running_node(tmp_path, wall) as (_, info):
        pin = info.cert_fingerprint
        made = await run_repl(tmp_path / "alice", info.port, pin, "/channel create news\n")
        assert made.returncode == 0, made.stderr
        out = made.stdout.decode()
        (secret,) = set(_SECRET.findall(out))
        assert "█" in out or "▀" in out or "▄" in out  # the QR code
        joined = await run_repl(
            tmp_path / "bob",
            info.port,
            pin,
            f"/channel join town {secret}\n/channel list\n/whoami\n",
        )
        assert joined.returncode == 0, joined.stderr
        assert "#town" in joined.stdout.decode()
        sent = await run_repl(
            tmp_path / "alice",
            info.port,
            pin,
            "/mesh broadcast news hello from alice\n/whoami\n",
        )
        assert sent.returncode == 0, sent.stderr
        assert "broadcast to [#news]" in sent.stdout.decode()
        alice_code = re.search(r"short code:\s+(\S+)", sent.stdout.decode())
        assert alice_code is not None
        got = await run_repl(tmp_path / "bob", info.port, pin, "/inbox --wait 10\n/stats\n")
        assert got.returncode == 0, got.stderr
        shown = got.stdout.decode()
        assert f"[#town] {alice_code.group(1)}: hello from alice" in shown, shown
        assert "channel_forged=0 channel_tampered=0" in shown
        # Leaving forgets the secret: a later broadcast is not fetched any more.
        left = await run_repl(tmp_path / "bob", info.port, pin, "/channel leave town\n")
        assert left.returncode == 0, left.stderr
        await run_repl(tmp_path / "alice", info.port, pin, "/mesh broadcast news second\n")
        again = await run_repl(tmp_path / "bob", info.port, pin, "/inbox\n")
        assert "second" not in again.stdout.decode()


async def test_forged_and_tampered_are_dropped_and_counted(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """Mallory is a member: she can seal, but not sign as alice. An outsider with the
    channel id but not the key can publish (the node cannot tell), never be read."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "m") as (a, b, m),
    ):
        text = await a.channel_create("news")
        await b.channel_join("news", text)
        secret = parse_secret(text)

        async def raw(msg: channel_pb2.ChannelMessage) -> None:
            resp = await m._rpc.call(
                "qpc.v1.Channel/Publish",
                channel_pb2.ChannelPublishRequest(message=msg),
                channel_pb2.ChannelPublishResponse,
            )
            assert resp.status == 0, resp.detail

        forged = seal(secret, a.ident.public_key, m.ident.sign, "alice: pay mallory", now_ms=wall())
        await raw(forged.to_proto())
        wrong = seal(os.urandom(32), m.ident.public_key, m.ident.sign, "noise", now_ms=wall())
        await raw(replace(wrong, channel_id=channel_id(secret)).to_proto())
        await a.broadcast("news", "the real one")
        got = await texts(b, 1)
        assert [(x.text, x.sender) for x in got] == [("the real one", a.ident.fingerprint)]
        assert (b.stats.channel_forged, b.stats.channel_tampered) == (1, 1)
        assert any("forged" in w for w in b.stats.warnings)
        assert any("tampered" in w for w in b.stats.warnings)
        # Dropped for good: fetching again shows and counts nothing new.
        assert await b.receive(0) == []
        assert (b.stats.channel_forged, b.stats.channel_tampered) == (1, 1)


async def test_channel_limits_apply_live(tmp_path: Path, wall: ManualWallClock) -> None:
    """A reload's channels.* values hold from the next message (the RELOAD decision)."""
    async with (
        running_node(tmp_path, wall) as (node, info),
        users(tmp_path, info, wall, "a") as (a,),
    ):
        secret = os.urandom(32)

        async def publish(body: str, **kw: object) -> channel_pb2.ChannelPublishResponse:
            m = seal(secret, a.ident.public_key, a.ident.sign, body, now_ms=wall()).to_proto()
            for k, v in kw.items():
                setattr(m, k, v)
            return await a._rpc.call(
                "qpc.v1.Channel/Publish",
                channel_pb2.ChannelPublishRequest(message=m),
                channel_pb2.ChannelPublishResponse,
            )

        assert (await publish("x" * 600)).status == rpc_pb2.STATUS_CODE_OK
        ch = msgspec.structs.replace(
            node.cfg.channels, max_message_bytes=512, max_expiry_s=60, max_messages=1
        )
        report = await node.reload(msgspec.structs.replace(node.cfg, channels=ch))
        assert set(report.applied) == {
            "channels.max_message_bytes",
            "channels.max_expiry_s",
            "channels.max_messages",
        }
        assert (await publish("x" * 600)).status == rpc_pb2.STATUS_CODE_PAYLOAD_TOO_LARGE
        far = await publish("y", expiry_ms=wall() + 61_000)
        assert far.status == rpc_pb2.STATUS_CODE_INVALID_ARGUMENT
        assert (await publish("z", expiry_ms=wall() + 30_000)).status == rpc_pb2.STATUS_CODE_OK
        assert node.channels is not None
        assert (await node.channels.totals()).messages == 1  # the cap of 1 evicted the first
        report = await node.reload(
            msgspec.structs.replace(
                node.cfg, channels=msgspec.structs.replace(node.cfg.channels, publish_rate=0.001)
            )
        )
        assert report.applied == ("channels.publish_rate",)
        # Burst now 1 (4 x 0.001, at least 1): the session's bucket refills from there.
        assert node.channel_service is not None
        assert node.channel_service.limiter.burst == 1.0


async def test_interactive_repl_shows_a_broadcast_live_and_completes_channel_names(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """bob's interactive ``qpc repl`` (a pty): joins, Tab completes the channel name,
    broadcasts; alice's broadcast shows up by itself, with her short code."""
    async with running_node(tmp_path, wall) as (_, info):
        pin = info.cert_fingerprint
        made = await run_repl(tmp_path / "alice", info.port, pin, "/channel create news\n/whoami\n")
        assert made.returncode == 0, made.stderr
        (secret,) = set(_SECRET.findall(made.stdout.decode()))
        a_code = re.search(r"short code:\s+(\S+)", made.stdout.decode())
        assert a_code is not None
        repl = await start_pty_repl(tmp_path / "bob", info.port, pin)
        try:
            await repl.wait_for("type /help")
            repl.type("/whoami")
            await repl.wait_for("short code:")
            b_code = re.search(r"short code:\s+(\S+)", repl.text)
            assert b_code is not None
            repl.type(f"/channel join town {secret}")
            await repl.wait_for("joined channel #town")
            os.write(repl._master, b"/mesh broadcast t\t")  # completion is asynchronous
            await repl.wait_until(
                lambda: "/meshbroadcasttown" in repl.text.replace(" ", ""), "completion"
            )
            os.write(repl._master, b" hi from bob\r")
            await repl.wait_for("broadcast to [#town]")
            sent = await run_repl(
                tmp_path / "alice", info.port, pin, "/mesh broadcast news hello bob\n"
            )
            assert sent.returncode == 0, sent.stderr
            await repl.wait_for(f"[#town] {a_code.group(1)}: hello bob")
            assert await repl.quit() == 0
        finally:
            await repl.aclose()
        got = await run_repl(tmp_path / "alice", info.port, pin, "/inbox --wait 10\n")
        assert f"[#news] {b_code.group(1)}: hi from bob" in got.stdout.decode()

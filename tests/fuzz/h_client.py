"""What a user agent receives: padded payloads, Sealed wrappers, MLS messages, AppMessages.

The "agent" environment is bob's real agent (real Identity, real ClientState
in a tmp dir) after joining a group that alice (the committer) created; its
RPC client has no node behind it, so a path that tried to call out would
fail with a typed RpcError rather than touch a network. Inputs go through
``Agent._handle`` -- the exact path ``Agent.receive`` runs for every fetched
message -- which must drop what it cannot use and raise nothing untyped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from google.protobuf.message import DecodeError

from qpc_node import crypto
from qpc_node.client.agent import Agent, Incoming
from qpc_node.client.groups import note_from_pb
from qpc_node.client.mlsheader import PRIVATE_MESSAGE, PUBLIC_MESSAGE, parse_header
from qpc_node.client.state import AsyncClientState, ClientState
from qpc_node.errors import QpcError, RemoteProtocolError
from qpc_node.groups.fork import branch_tag
from qpc_node.groups.rejoin import Step, rejoin_key, seal_offer
from qpc_node.ops.clock import system_wall_ms
from qpc_node.rpc.client import RetryPolicy, RpcClient
from qpc_node.wire.envelope import pad
from qpc_node.wire.gen.qpc.v1 import client_pb2
from tests.fuzz.registry import Invariant, environment, pure, register

_C = client_pb2
NODE_FPR = b"\x22" * 32


@dataclass(slots=True)
class AgentEnv:
    agent: Agent
    state: ClientState
    alice: crypto.Identity
    bob: crypto.Identity
    group: crypto.Group  # alice's side of the group bob joined
    alice_fpr: bytes
    seq: int = 0


async def _no_node() -> trio.abc.HalfCloseableStream:
    raise trio.ClosedResourceError("the fuzz agent has no node")


def _sealed(kind: int, gid: bytes, data: bytes, *, describes: bool = False) -> bytes:
    return _C.Sealed(kind=kind, group_id=gid, data=data, describes=describes).SerializeToString()  # type: ignore[arg-type]


@environment("agent")
@contextlib.asynccontextmanager
async def agent_env(tmp: Path) -> AsyncIterator[AgentEnv]:
    alice = crypto.Identity.create(tmp / "alice", os.urandom(32), durable=False)
    bob = crypto.Identity.create(tmp / "bob", os.urandom(32), durable=False)
    (tmp / "bob-state").mkdir(exist_ok=True)
    state = ClientState(tmp / "bob-state", os.urandom(32))
    rpc = RpcClient(_no_node, retry_policy=RetryPolicy(max_attempts=1))
    agent = Agent(
        bob, AsyncClientState(state), rpc, node_cert_fingerprint=NODE_FPR, wall_ms=system_wall_ms
    )
    g = alice.create_group()
    _commit, welcome = g.add([bob.key_package()])
    g.merge_pending_commit()
    a_fpr = bytes.fromhex(alice.fingerprint)
    env = AgentEnv(agent, state, alice, bob, g, a_fpr)
    gid = bytes(g.group_id)
    if await agent._handle(0, pad(_sealed(_C.Sealed.WELCOME, gid, welcome))) is not None:
        raise RuntimeError("welcome produced text")
    info = _C.AppMessage(info=_C.GroupInfo(name="fuzz", direct=False, committer=a_fpr))
    named = g.encrypt(info.SerializeToString())  # the follow-up: marked, read at once
    await agent._handle(0, pad(_sealed(_C.Sealed.MLS_MESSAGE, gid, named, describes=True)))
    hello = _C.AppMessage(text="hello").SerializeToString()
    got = await agent._handle(0, pad(_sealed(_C.Sealed.MLS_MESSAGE, gid, g.encrypt(hello))))
    if not isinstance(got, Incoming) or got.text != "hello":
        raise RuntimeError(f"agent setup failed: {got!r}")
    try:
        yield env
    finally:
        state.close()


def _sealed_seeds(env: AgentEnv) -> list[bytes]:
    g = env.group
    gid = bytes(g.group_id)
    app = [
        _C.AppMessage(text="hi there", sent_ms=1),
        _C.AppMessage(text=""),
        _C.AppMessage(info=_C.GroupInfo(name="renamed", committer=env.alice_fpr)),
        _C.AppMessage(leave=_C.LeaveRequest()),
    ]
    seeds = [_sealed(_C.Sealed.MLS_MESSAGE, gid, g.encrypt(m.SerializeToString())) for m in app]
    # A second group of alice's: a Welcome for bob, then a commit he may not have seen.
    g2 = env.alice.create_group()
    commit, welcome = g2.add([env.bob.key_package()])
    g2.merge_pending_commit()
    seeds.append(_sealed(_C.Sealed.WELCOME, bytes(g2.group_id), welcome))
    seeds.append(_sealed(_C.Sealed.MLS_MESSAGE, bytes(g2.group_id), g2.update()))
    seeds.append(_sealed(_C.Sealed.MLS_MESSAGE, gid, commit))  # commit of another group
    # Rejoin offers (Stage B): one of the group's current epoch, which bob shares.
    step = Step(branch_tag(g), rejoin_key(g), None)
    offer = seal_offer(gid, [step], [env.alice_fpr.hex()], g.group_info())
    seeds.append(_sealed(_C.Sealed.REJOIN_OFFER, gid, offer))
    seeds.append(_sealed(0, gid, b"\x00\x01"))
    seeds.append(_sealed(7, b"", b""))
    return seeds


def handle_target(env: AgentEnv, wrap: Callable[[bytes], bytes]) -> Callable[[bytes], Any]:
    async def run(data: bytes) -> str:
        env.seq += 1
        got = await env.agent._handle(env.seq, wrap(data))
        return "text" if got is not None else "dropped"

    return run


def app_target(env: AgentEnv) -> Callable[[bytes], Any]:
    """alice (a real member) encrypts arbitrary AppMessage bytes: content-level fuzzing."""
    gid = bytes(env.group.group_id)

    async def run(data: bytes) -> str:
        env.seq += 1
        ct = env.group.encrypt(data)
        got = await env.agent._handle(env.seq, pad(_sealed(_C.Sealed.MLS_MESSAGE, gid, ct)))
        try:
            app = _C.AppMessage.FromString(data)
        except Exception:
            app = None
        is_text = app is not None and app.WhichOneof("body") == "text"
        if is_text and (got is None or app is None or got.text != app.text):
            raise Invariant(f"a text from a member was lost: {got!r}")
        return "text" if got is not None else "dropped"

    return run


register(
    "client.payload",
    env="agent",
    seeds=lambda env: [pad(s) for s in _sealed_seeds(env)],
    target=lambda env: handle_target(env, lambda d: d),
    allowed=(QpcError,),
    cost=2.0,
)
register(
    "client.sealed",
    env="agent",
    seeds=_sealed_seeds,
    target=lambda env: handle_target(env, pad),
    allowed=(QpcError,),
    cost=2.0,
)
register(
    "client.app_message",
    env="agent",
    seeds=lambda env: [
        m.SerializeToString()
        for m in (
            _C.AppMessage(text="hello \u00e9\U0001f600", sent_ms=2**64 - 1),
            _C.AppMessage(info=_C.GroupInfo(name="g", direct=True, committer=env.alice_fpr)),
            _C.AppMessage(info=_C.GroupInfo(name="x" * 80, committer=b"\0" * 32)),
            _C.AppMessage(leave=_C.LeaveRequest()),
            _C.AppMessage(
                intent=_C.GroupIntent(
                    intent_id=b"\x01" * 16,
                    kind=_C.GroupIntent.ADD,
                    target=b"\x02" * 32,
                    proposal_ref=b"\x03" * 32,
                    epoch=1,
                )
            ),
            _C.AppMessage(intent=_C.GroupIntent(kind=_C.GroupIntent.LEAVE, epoch=2**64 - 1)),
            _C.AppMessage(pull=_C.CommitPull(from_epoch=0)),
            _C.AppMessage(pull=_C.CommitPull(from_epoch=2**64 - 1)),
            _C.AppMessage(catch_up=_C.CatchUp(since=b"\x05" * 16)),
            _C.AppMessage(catch_up=_C.CatchUp(since=b"")),
        )
    ],
    target=app_target,
    allowed=(QpcError,),
    cost=3.0,
)


# -- the MLS core on its own (tests/unit/test_mls_fuzz.py runs 10k of these in CI;
#    registered here so the long run covers them at scale) -----------------------------


@dataclass(slots=True)
class MlsEnv:
    group: crypto.Group  # alice's
    carol: crypto.Identity
    seeds_process: list[bytes]
    seeds_join: list[bytes]
    seeds_kp: list[bytes]


@environment("mls")
@contextlib.asynccontextmanager
async def mls_env(tmp: Path) -> AsyncIterator[MlsEnv]:
    ids = [crypto.Identity.create(tmp / n, os.urandom(32), durable=False) for n in "abc"]
    alice, bob, carol = ids
    ga = alice.create_group()
    commit, welcome = ga.add([bob.key_package()])
    ga.merge_pending_commit()
    gb = bob.join(welcome)
    gc = bob.create_group()
    _c2, welcome_c = gc.add([carol.key_package()])
    yield MlsEnv(
        ga,
        carol,
        [gb.encrypt(b"application " * 8), gb.encrypt(b""), gb.update(), commit],
        [welcome_c, welcome],
        [carol.key_package(), bob.key_package(last_resort=True), alice.key_package()],
    )


register(
    "mls.process",
    env="mls",
    seeds=lambda env: env.seeds_process,
    target=lambda env: env.group.process,
    allowed=(crypto.MlsError,),
)
register(
    "mls.join",
    env="mls",
    seeds=lambda env: env.seeds_join,
    target=lambda env: env.carol.join,
    allowed=(crypto.MlsError,),
)
register(
    "mls.key_package",
    env="mls",
    seeds=lambda env: env.seeds_kp,
    target=lambda _env: crypto.inspect_key_package,
    allowed=(crypto.MlsError,),
)


# -- the clear MLS header the agent reads to tell a future epoch from a past one -------


def _mls_header_seeds() -> list[bytes]:
    def msg(wire_format: int, gid: bytes, epoch: int, long_len: bool = False) -> bytes:
        n = len(gid)
        length = (0x4000 | n).to_bytes(2, "big") if long_len else bytes([n])
        head = (1).to_bytes(2, "big") + wire_format.to_bytes(2, "big")
        return head + length + gid + epoch.to_bytes(8, "big") + b"\x01rest"

    return [
        msg(PRIVATE_MESSAGE, b"g" * 16, 3),
        msg(PUBLIC_MESSAGE, b"h" * 32, 2**64 - 1),
        msg(PRIVATE_MESSAGE, b"i" * 100, 0, long_len=True),
        msg(PUBLIC_MESSAGE, b"", 1),
    ]


def mls_header_target(data: bytes) -> str:
    header = parse_header(data)
    at = 4 + (1 << (data[4] >> 6))  # where the group id starts, after its length
    end = at + len(header.group_id)
    if data[at:end] != header.group_id or data[end : end + 8] != header.epoch.to_bytes(8, "big"):
        raise Invariant("group id / epoch are not the bytes after the length")
    return "valid"


register(
    "client.mls_header",
    seeds=lambda _env: _mls_header_seeds(),
    target=lambda _env: mls_header_target,
    allowed=(RemoteProtocolError,),
)


def _group_intent(data: bytes) -> None:
    """A GroupIntent note as the group driver reads it: a note or None, never a crash."""
    note = note_from_pb(_C.GroupIntent.FromString(data))
    if note is not None and (len(note.intent_id) != 16 or len(note.target) not in (0, 64)):
        raise Invariant(f"malformed note accepted: {note}")


pure(
    "client.group_intent",
    seeds=lambda: [
        _C.GroupIntent(
            intent_id=b"\x01" * 16, kind=k, target=t, proposal_ref=b"\x03" * 32, epoch=e
        ).SerializeToString()
        for k, t, e in (
            (_C.GroupIntent.ADD, b"\x02" * 32, 1),
            (_C.GroupIntent.REMOVE, b"\x02" * 32, 2**64 - 1),
            (_C.GroupIntent.UPDATE, b"", 0),
            (_C.GroupIntent.LEAVE, b"", 7),
        )
    ],
    target=_group_intent,
    allowed=(DecodeError,),
)

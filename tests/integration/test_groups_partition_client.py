"""Stage B end to end on a real node (docs/groups.md): two committers commit on the same
epoch while they do not read their mail (relays paused: the node holds each side's
commit for the other), then everyone reads. Every member ends on the same branch and
authenticator, the members both commits removed are gone on both sides, and texts sent
on the losing branch before the heal still show (read-only from the retained state).

The wall clock is manual; the second committer's failover (Stage A) commits its own
request once the first committer has been silent for the committer timeout: its
driver's timers run without its inbox (its mailbox fetch is what the partition stops).
"""

from __future__ import annotations

from pathlib import Path

from node_harness import flush_inbox, running_node, users

from qpc_node.client.agent import Agent
from qpc_node.client.branches import CT_COMMIT, CT_PROPOSAL, content_type
from qpc_node.client.inbox import HOLD
from qpc_node.groups.core import GroupConfig, Resend
from qpc_node.ops.clock import ManualWallClock
from qpc_node.wire.envelope import unpad
from qpc_node.wire.gen.qpc.v1 import client_pb2, service_pb2

QUIET_MS = 2_000


async def settle(wall: ManualWallClock, *agents: Agent, rounds: int = 5) -> dict[str, list[str]]:
    """Every agent reads its mail and runs its timers, time passing between rounds;
    the texts each was shown, by fingerprint."""
    shown: dict[str, list[str]] = {a.ident.fingerprint: [] for a in agents}
    for _ in range(rounds):
        for a in agents:
            shown[a.ident.fingerprint] += [m.text for m in await flush_inbox(a)]
        wall.advance(QUIET_MS)
    return shown


def _gid(agent: Agent, name: str) -> bytes:
    conv = agent._st.conversation(name)
    assert conv is not None
    return conv.group_id


async def test_partitioned_committers_converge_on_one_branch(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "c", "d") as agents,
    ):
        a = agents[0]
        await a.group_create("team")
        for x in agents[1:]:
            assert await a.group_invite("team", x.ident.fingerprint) == "invited"
        await settle(wall, *agents)
        committers = (await a.group_info("team")).committers
        by_fpr = {x.ident.fingerprint: x for x in agents}
        c0, c1 = by_fpr[committers[0]], by_fpr[committers[1]]
        p, q = (x for x in agents if x not in (c0, c1))
        gid = _gid(a, "team")
        epoch = c0.ident.group(gid).epoch

        # Partition: c0 and p on one side, c1 and q on the other; nobody reads mail.
        # Side X: the first committer removes q at once.
        await c0.group_remove("team", q.ident.fingerprint)
        assert c0.ident.group(gid).epoch == epoch + 1
        await c0.group_send("team", "from c0 on x")  # epoch n + 1 of branch x
        await p.group_send("team", "from p on x")  # p has not seen it: epoch n
        # Side Y: c1 asks to remove p; c0 never answers, so c1 commits it itself.
        assert await c1.group_remove("team", p.ident.fingerprint) == "requested"
        wall.advance(GroupConfig().committer_timeout_ms + QUIET_MS)
        await c1._groups.timers()
        assert c1.ident.group(gid).epoch == epoch + 1
        await c1.group_send("team", "from c1 on y")  # epoch n + 1 of branch y
        await q.group_send("team", "from q on y")
        x_tag = c0._branches.tag(c0.ident.group(gid))
        y_tag = c1._branches.tag(c1.ident.group(gid))
        assert x_tag != y_tag  # two branches of epoch n + 1

        # Heal: everyone reads.
        shown = await settle(wall, *agents, rounds=8)
        survivors = [c0, c1]
        tags = {x._branches.tag(x.ident.group(gid)) for x in survivors}
        assert len(tags) == 1
        auths = {x.ident.group(gid).epoch_authenticator() for x in survivors}
        assert len(auths) == 1
        for x in survivors:
            members = set(x.ident.group(gid).members())
            assert members == {c0.ident.fingerprint, c1.ident.fingerprint}, x
            assert x.stats.undecryptable == 0
        assert sum(x._branches.stats.switches for x in agents) >= 1
        for removed in (p, q):
            assert removed._st.conversation("team") is None
        # Every text shows exactly once on each survivor: the loser's own text of the
        # losing branch was sent again on the winner (same app id, shown once).
        for x in survivors:
            got = shown[x.ident.fingerprint]
            for text in ("from p on x", "from q on y", "from c0 on x", "from c1 on y"):
                mine = text.endswith(f"{'c0' if x is c0 else 'c1'} on {'x' if x is c0 else 'y'}")
                assert got.count(text) == (0 if mine else 1), (text, got)


async def test_a_commit_before_the_proposal_it_names_is_held_not_dropped(
    tmp_path: Path, wall: ManualWallClock
) -> None:
    """Relays reorder envelopes: c gets the committer's commit before the proposal it
    covers by reference. The inbox holds the commit (typed MissingProposal from the
    core) instead of dropping it as undecryptable, and it applies once the proposal
    is in."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "c") as (a, b, c),
    ):
        await a.group_create("team")
        for x in (b, c):
            assert await a.group_invite("team", x.ident.fingerprint) == "invited"
        await settle(wall, a, b, c)
        await b.group_update("team")  # a proposal; a (first committer) commits it
        await settle(wall, a, b)
        gid = _gid(a, "team")
        assert a.ident.group(gid).epoch == c.ident.group(gid).epoch + 1
        resp = await c._rpc.call(
            "qpc.v1.Delivery/Fetch",
            service_pb2.FetchRequest(after_seq=c._st.cursor(c.node), limit=64),
            service_pb2.FetchResponse,
        )
        kinds: dict[int, tuple[int, bytes]] = {}
        for m in resp.messages:
            payload = bytes(m.envelope.ciphertext)
            sealed = client_pb2.Sealed.FromString(unpad(payload))
            kinds.setdefault(content_type(bytes(sealed.data)), (m.seq, payload))
        commit, proposal = kinds[CT_COMMIT], kinds[CT_PROPOSAL]
        assert await c._inbox.handle(*commit) is HOLD
        assert c.stats.undecryptable == 0
        assert await c._inbox.handle(*proposal) is None
        assert await c._inbox.handle(*commit) is None
        assert c.ident.group(gid).epoch_authenticator() == a.ident.group(gid).epoch_authenticator()


async def test_own_commits_answer_pulls(tmp_path: Path, wall: ManualWallClock) -> None:
    """A member missing commits pulls them from whoever logged them; the committer is
    often the only one that has them all (a small group, or one side of a partition),
    so its own commits are in its log too."""
    async with (
        running_node(tmp_path, wall) as (_, info),
        users(tmp_path, info, wall, "a", "b", "c") as (a, b, c),
    ):
        await a.group_create("team")
        assert await a.group_invite("team", b.ident.fingerprint) == "invited"
        assert await a.group_invite("team", c.ident.fingerprint) == "invited"
        await settle(wall, a)
        gid = _gid(a, "team")
        conv = a._st.conversation("team")
        assert conv is not None
        g = a.ident.group(gid)
        core = await a._groups.core(conv, g)
        answer = core.on_pull(b.ident.fingerprint, 1, wall())
        assert [type(x).__name__ for x in answer] == ["Resend"]
        (resend,) = answer
        assert isinstance(resend, Resend) and len(resend.messages) == 1
        assert content_type(resend.messages[0]) == CT_COMMIT

"""A user's client for the group scenario in network namespaces (issue 14, Stage B).

``python -m tests.mesh.group_driver --server HOST:PORT --pin PIN --data DIR``: the
JSON-lines driver of ``tests.integration.agent_driver`` (``mesh`` op), whose agent
reads its mail and runs its group timers in the background every ``POLL_S`` (what the
REPL does between prompts), with short group timings so a run fits a test, plus

- ``{"op": "create", "name": N}``, ``{"op": "invite"|"remove", "name": N, "peer": FPR}``
  (answers "invited"/"requested"/...), ``{"op": "update", "name": N}``,
  ``{"op": "say", "name": N, "text": T}``: the Agent's group calls, as /group runs them;
- ``{"op": "shown"}``: every text shown so far, as [sender, text] pairs, and the
  warnings;
- ``{"op": "state", "name": N}``: epoch, a short epoch authenticator, members,
  branch tag (hex), committers, and the agent's undecryptable and switch counts; or
  {"gone": true} once we are out of the group.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import trio

from qpc_node import crypto
from qpc_node.client.agent import Agent
from qpc_node.client.connect import open_agent
from qpc_node.errors import QpcError
from qpc_node.groups.core import GroupConfig
from qpc_node.ops.config import parse_hostport
from tests.integration.agent_driver import Driver as BaseDriver

POLL_S = 0.5
TIMINGS = GroupConfig(
    quiescence_ms=500,
    max_commit_delay_ms=2_000,
    pull_after_ms=3_000,
    committer_timeout_ms=8_000,
)


class Driver(BaseDriver):
    def __init__(self, agent: Agent) -> None:
        super().__init__(agent)
        self.shown: list[tuple[str, str]] = []
        self.lock = trio.Lock()

    async def poll_loop(self) -> None:
        while True:
            with contextlib.suppress(QpcError):
                async with self.lock:
                    got = await self.agent.receive(0)
                    await self.agent.flush_outbox()
                self.shown += [(m.sender, m.text) for m in got]
            await trio.sleep(POLL_S)

    async def state(self, name: str) -> dict[str, Any]:
        conv = self.agent._st.conversation(name)
        if conv is None:
            return {"gone": True}
        try:
            g = self.agent.ident.group(conv.group_id)
        except crypto.MlsError:
            return {"gone": True}
        if not g.is_active:
            return {"gone": True}
        info = await self.agent.group_info(name)
        return {
            "epoch": g.epoch,
            "auth": g.epoch_authenticator().hex()[:16],
            "members": sorted(g.members()),
            "tag": self.agent._branches.tag(g).hex(),
            "committers": list(info.committers),
            "undecryptable": self.agent.stats.undecryptable,
            "switches": self.agent._branches.stats.switches,
            "readonly": self.agent._branches.stats.readonly,
            "held": self.agent.stats.held,
            "out_of_window": self.agent._branches.stats.out_of_window,
            "warnings": self.agent.stats.warnings[-6:],
        }

    async def group_op(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op, name = cmd["op"], str(cmd.get("name", ""))
        async with self.lock:
            try:
                if op == "create":
                    await self.agent.group_create(name)
                    return {"ok": True}
                if op == "invite":
                    return {"ok": await self.agent.group_invite(name, str(cmd["peer"]))}
                if op == "remove":
                    return {"ok": await self.agent.group_remove(name, str(cmd["peer"]))}
                if op == "update":
                    await self.agent.group_update(name)
                    return {"ok": True}
                if op == "say":
                    await self.agent.group_send(name, str(cmd["text"]))
                    return {"ok": True}
            except QpcError as exc:
                return {"error": f"{type(exc).__name__}: {exc}"}
        return {"error": f"unknown op {op!r}"}

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op in ("create", "invite", "remove", "update", "say"):
            return await self.group_op(cmd)
        if op == "shown":
            return {"texts": self.shown, "warnings": list(self.agent.stats.warnings)}
        if op == "state":
            async with self.lock:
                return await self.state(str(cmd["name"]))
        return await super().handle(cmd)


async def main(args: argparse.Namespace) -> None:
    host, port = parse_hostport(args.server)
    stdin = trio.wrap_file(sys.stdin)
    async with open_agent(Path(args.data), host, port, pin=args.pin, group_config=TIMINGS) as agent:
        drv = Driver(agent)
        print(json.dumps({"ready": agent.ident.fingerprint}), flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drv.poll_loop)
            while line := await stdin.readline():
                print(json.dumps(await drv.handle(json.loads(line))), flush=True)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--pin", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--receive", action="store_true", help="unused (always polls)")
    trio.run(main, p.parse_args())

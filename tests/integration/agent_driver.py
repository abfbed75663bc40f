"""A user's client as a process a test steers: ``python -m tests.integration.agent_driver
--server HOST:PORT --pin PIN --data DIR`` (run inside a network namespace by the mesh
tests, where a REPL per message would be far too slow).

It logs in (its home binding spreads over the mesh), prints ``{"ready": FPR}``, then
answers one JSON line per command line on stdin:

- ``{"op": "send", "to": FPR, "n": N, "hop_limit": H}``: N envelopes through the agent's
  durable outbox (Delivery/Enqueue in batches, what the node does not take is retried
  with the outbox's backoff until every one is taken, bounded); answers the ids and
  how many the node took at once.
- ``{"op": "enqueue", "to": FPR, "hop_limit": H}``: one envelope in one Enqueue call,
  bypassing the outbox; answers the call's typed status and detail.
- ``{"op": "received"}``: the ids this client fetched and acked so far (a background
  loop receives as a client does: Fetch after the cursor, Ack up to it), with repeats.
- ``{"op": "mesh"}``: the node's view (/mesh peers and routes): users homed mesh-wide,
  hops per destination node, state per neighbour.

Envelopes carry opaque bytes, not MLS: the tests count ids at the transport level,
where "exactly once" is decided (hop-by-hop custody, idempotent on msg_id).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import trio

from qpc_node.client.agent import Agent
from qpc_node.client.connect import open_agent
from qpc_node.client.outbox import Sent
from qpc_node.ops.config import parse_hostport
from qpc_node.wire.envelope import Envelope
from qpc_node.wire.gen.qpc.v1 import client_pb2, service_pb2

BATCH = 100
SEND_WITHIN = 120.0  # bound on getting every envelope of one "send" taken


class Driver:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.received: list[str] = []

    def _envelope(self, to: str, hop_limit: int, i: int) -> Envelope:
        e = self.agent._envelope(
            bytes.fromhex(to), client_pb2.Sealed.MLS_MESSAGE, b"drv", f"m{i}".encode()
        )
        return Envelope(e.msg_id, e.recipient, e.expiry_ms, hop_limit, e.ciphertext)

    async def send(self, to: str, n: int, hop_limit: int) -> dict[str, Any]:
        envs = [self._envelope(to, hop_limit, i) for i in range(n)]
        first = 0
        with trio.fail_after(SEND_WITHIN):
            for i in range(0, n, BATCH):
                fates = await self.agent._submit(envs[i : i + BATCH])
                first += sum(1 for f in fates.values() if f is Sent.DELIVERED)
            for _ in range(int(SEND_WITHIN / 0.2)):  # retries wait for their backoff
                if not await self.agent.flush_outbox():
                    break
                await trio.sleep(0.2)
        return {"ids": [e.msg_id.hex() for e in envs], "taken_at_once": first}

    async def enqueue(self, to: str, hop_limit: int) -> dict[str, Any]:
        env = self._envelope(to, hop_limit, 0)
        resp = await self.agent._rpc.call(
            "qpc.v1.Delivery/Enqueue",
            service_pb2.EnqueueRequest(envelopes=[env.to_proto()]),
            service_pb2.EnqueueResponse,
        )
        (res,) = resp.results
        return {"id": env.msg_id.hex(), "status": res.status, "detail": res.detail}

    async def receive_loop(self) -> None:
        cursor = 0
        while True:
            resp = await self.agent._rpc.call(
                "qpc.v1.Delivery/Fetch",
                service_pb2.FetchRequest(after_seq=cursor, limit=256, wait_ms=500),
                service_pb2.FetchResponse,
                timeout=15.0,
            )
            if not resp.messages:
                continue
            self.received += [bytes(m.envelope.msg_id).hex() for m in resp.messages]
            cursor = resp.messages[-1].seq
            await self.agent._rpc.call(
                "qpc.v1.Delivery/Ack",
                service_pb2.AckRequest(up_to_seq=cursor),
                service_pb2.AckResponse,
            )

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "send":
            return await self.send(cmd["to"], int(cmd["n"]), int(cmd.get("hop_limit", 8)))
        if op == "enqueue":
            return await self.enqueue(cmd["to"], int(cmd.get("hop_limit", 8)))
        if op == "received":
            return {"ids": list(self.received)}
        if op == "mesh":
            view = await self.agent.mesh_status()
            return {
                "bindings": view.bindings,
                "routes": {bytes(r.destination).hex(): r.hops for r in view.routes},
                "peers": {bytes(p.node_id).hex(): p.state for p in view.peers},
            }
        return {"error": f"unknown op {op!r}"}


async def main(args: argparse.Namespace) -> None:
    host, port = parse_hostport(args.server)
    stdin = trio.wrap_file(sys.stdin)
    async with open_agent(Path(args.data), host, port, pin=args.pin) as agent:
        drv = Driver(agent)
        print(json.dumps({"ready": agent.ident.fingerprint}), flush=True)
        async with trio.open_nursery() as nursery:
            if args.receive:
                nursery.start_soon(drv.receive_loop)
            while line := await stdin.readline():
                print(json.dumps(await drv.handle(json.loads(line))), flush=True)
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--pin", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--receive", action="store_true", help="fetch and ack in the background")
    trio.run(main, p.parse_args())

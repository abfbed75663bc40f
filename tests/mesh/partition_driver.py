"""``tests.integration.agent_driver`` plus what the partition tests need.

``python -m tests.mesh.partition_driver --server HOST:PORT --pin PIN --data DIR``:
the same JSON-lines driver, with

- ``{"op": "send_ttl", "to": FPR, "n": N, "ttl_ms": T, "tag": S}``: N envelopes whose
  absolute expiry is now + T (what a sender sets), queued in the agent's durable
  outbox and handed to the node at once; answers their ids (in the order they were
  queued), their expiry, and what the node said of each at once (the outbox fate
  and, when the node said why, its detail);
- ``{"op": "channel_publish", "secret": "qpcch:...", "body": S, "ttl_ms": T}``: one
  channel message sealed as the client does (``client/channels.seal``) but with the
  expiry now + T, published with Channel/Publish; answers its id, expiry and the
  node's status;
- ``{"op": "channel_burst", "secret": "qpcch:...", "n": N, "ttl_ms": T, "tag": S}``: N
  such messages published one after the other; answers their ids in order and the
  set of statuses;
- ``{"op": "channel_ids", "secret": "qpcch:..."}``: the ids of that channel's messages
  the node holds, in its order (Channel/Fetch from the start, page by page; nothing
  is acknowledged: a read-only view of the node's channel store);
- ``{"op": "pending"}``: how many envelopes the outbox still holds (not yet taken by
  the node).

A background loop flushes the outbox every ``FLUSH_S`` (what the interactive REPL
does between prompts): what the node could not take yet (no route) is retried
with the outbox's backoff, what expires first is dropped there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import trio

from qpc_node.client.channels import channel_id, parse_secret, seal
from qpc_node.client.connect import open_agent
from qpc_node.errors import QpcError
from qpc_node.ops.config import parse_hostport
from qpc_node.wire.envelope import DEFAULT_HOP_LIMIT, Envelope
from qpc_node.wire.gen.qpc.v1 import channel_pb2, client_pb2
from tests.integration.agent_driver import Driver as BaseDriver

FLUSH_S = 0.5
FETCH_PAGES = 64  # bound on Channel/Fetch pages one channel_ids reads


class Driver(BaseDriver):
    async def send_ttl(self, to: str, n: int, ttl_ms: int, tag: str) -> dict[str, Any]:
        expiry = int(time.time() * 1000) + ttl_ms
        envs = []
        for i in range(n):
            e = self.agent._envelope(
                bytes.fromhex(to), client_pb2.Sealed.MLS_MESSAGE, b"drv", f"{tag}{i}".encode()
            )
            envs.append(Envelope(e.msg_id, e.recipient, expiry, DEFAULT_HOP_LIMIT, e.ciphertext))
        fates = await self.agent._submit(envs)
        routes = self.agent._outbox.routes
        return {
            "ids": [e.msg_id.hex() for e in envs],
            "expiry_ms": expiry,
            "fates": [fates[e.msg_id].value for e in envs],
            "details": [repr(routes.get(e.msg_id)) for e in envs],
        }

    async def channel_publish(self, secret: str, body: str, ttl_ms: int) -> dict[str, Any]:
        ident = self.agent.ident
        msg = seal(
            parse_secret(secret),
            ident.public_key,
            ident.sign,
            body,
            now_ms=int(time.time() * 1000),
            ttl_ms=ttl_ms,
        )
        resp = await self.agent._rpc.call(
            "qpc.v1.Channel/Publish",
            channel_pb2.ChannelPublishRequest(message=msg.to_proto()),
            channel_pb2.ChannelPublishResponse,
        )
        return {
            "id": msg.msg_id.hex(),
            "expiry_ms": msg.expiry_ms,
            "status": resp.status,
            "detail": resp.detail,
        }

    async def channel_burst(self, secret: str, n: int, ttl_ms: int, tag: str) -> dict[str, Any]:
        ids, statuses = [], set()
        for i in range(n):
            r = await self.channel_publish(secret, f"{tag}{i}", ttl_ms)
            ids.append(r["id"])
            statuses.add(r["status"])
        return {"ids": ids, "statuses": sorted(statuses)}

    async def channel_ids(self, secret: str) -> dict[str, Any]:
        cid = channel_id(parse_secret(secret))
        ids: list[str] = []
        after = 0
        for _ in range(FETCH_PAGES):
            resp = await self.agent._rpc.call(
                "qpc.v1.Channel/Fetch",
                channel_pb2.ChannelFetchRequest(
                    cursors=[channel_pb2.ChannelCursor(channel_id=cid, after_seq=after)],
                    limit=128,
                ),
                channel_pb2.ChannelFetchResponse,
            )
            for item in resp.messages:
                ids.append(bytes(item.message.msg_id).hex())
                after = max(after, item.seq)
            if not resp.more or not resp.messages:
                break
        return {"ids": ids}

    async def flush_loop(self) -> None:
        while True:
            # on a failed call the outbox rescheduled what it holds: the next round retries
            with contextlib.suppress(QpcError):
                await self.agent.flush_outbox()
            await trio.sleep(FLUSH_S)

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd["op"] == "send_ttl":
            return await self.send_ttl(
                cmd["to"], int(cmd["n"]), int(cmd["ttl_ms"]), str(cmd.get("tag", "m"))
            )
        if cmd["op"] == "channel_publish":
            return await self.channel_publish(
                str(cmd["secret"]), str(cmd["body"]), int(cmd["ttl_ms"])
            )
        if cmd["op"] == "channel_burst":
            return await self.channel_burst(
                str(cmd["secret"]), int(cmd["n"]), int(cmd["ttl_ms"]), str(cmd.get("tag", "b"))
            )
        if cmd["op"] == "channel_ids":
            return await self.channel_ids(str(cmd["secret"]))
        if cmd["op"] == "pending":
            return {"queued": await self.agent.flush_outbox()}
        return await super().handle(cmd)


async def main(args: argparse.Namespace) -> None:
    host, port = parse_hostport(args.server)
    stdin = trio.wrap_file(sys.stdin)
    async with open_agent(Path(args.data), host, port, pin=args.pin) as agent:
        drv = Driver(agent)
        print(json.dumps({"ready": agent.ident.fingerprint}), flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drv.flush_loop)
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

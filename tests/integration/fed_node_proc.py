"""A federated node as a real process (for kill -9 tests): ``python -m
tests.integration.fed_node_proc SPEC_JSON``.

SPEC: ``{"tmp": dir, "name": str, "port": int, "homes": {user_hex: node_hex},
"via": {node_hex: node_hex}, "peers": [[host, port, node_hex]]}``. Prints
``ready PORT`` once the node serves, then runs until killed. Federation config
keys are still refused by ``load_config``, so the test wires it here the way
``tests.integration.fed_nodes.fed_node`` does in-process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from qpc_node.federation.routes import StaticRoutes
from tests.integration.fed_nodes import fed_node, identity, peer


async def main(spec: dict[str, object]) -> None:
    tmp, name = Path(str(spec["tmp"])), str(spec["name"])
    _, nid = identity(tmp, name)
    homes = {bytes.fromhex(k): bytes.fromhex(v) for k, v in dict(spec["homes"]).items()}  # type: ignore[call-overload]
    via = {bytes.fromhex(k): bytes.fromhex(v) for k, v in dict(spec["via"]).items()}  # type: ignore[call-overload]
    peers = tuple(peer(int(p), bytes.fromhex(h)) for _, p, h in spec["peers"])  # type: ignore[attr-defined]
    async with fed_node(
        tmp,
        name,
        routes=StaticRoutes(nid, homes, via),
        peers=peers,
        port=int(spec["port"]),  # type: ignore[call-overload]
    ) as node:
        print(f"ready {node.info.port}", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))

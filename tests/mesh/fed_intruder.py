"""A peer that tries to relay into a node over ``qpc-fed/1`` without being trusted.

Run inside a test's namespace: ``python fed_intruder.py HOST PORT RECIPIENT_HEX CASE
[--bind PORT]``. CASE ``nocert``: a QUIC client offering ``qpc-fed/1`` with no
client certificate. CASE ``selfsigned``: a fresh self-signed Ed25519 node key (a
node id nobody pinned), dialling from ``--bind`` (e.g. the port of a pinned node
it impersonates at that node's address). Either way it then calls RelayEnqueue
with one envelope for RECIPIENT. Prints one JSON line: how far it got.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qpc_node.errors import QpcError
from qpc_node.federation.core import M_RELAY
from qpc_node.federation.trust import FederationClientTLS, MeshTrust
from qpc_node.ops.clock import system_wall_ms
from qpc_node.quic import ALPN_FEDERATION, ClientTLS, open_endpoint
from qpc_node.quic.tls import load_or_create_node_credentials
from qpc_node.rpc.client import NO_RETRY, RpcClient
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2


async def attempt(host: str, port: int, recipient: bytes, case: str, bind: int) -> dict[str, str]:
    out = {"case": case, "handshake": "", "relay": ""}
    if case == "nocert":
        # Accept whatever the node presents: the point is what *we* fail to present.
        tls: ClientTLS = _AnyServer()
    else:
        creds = load_or_create_node_credentials(Path(tempfile.mkdtemp()) / "keys")
        tls = FederationClientTLS(creds, MeshTrust())
    async with open_endpoint("::", bind) as ep:
        try:
            with trio.fail_after(10):
                conn = await ep.connect(host, port, tls)
        except (QpcError, OSError, trio.TooSlowError) as exc:
            out["handshake"] = f"refused: {type(exc).__name__}: {exc}"
            return out
        out["handshake"] = "ok"
        rpc = RpcClient(conn.open_stream, retry_policy=NO_RETRY)
        env = envelope_pb2.Envelope(
            msg_id=os.urandom(16),
            recipient=recipient,
            expiry_ms=system_wall_ms() + 3_600_000,
            hop_limit=4,
            ciphertext=b"intruder" * 8,
        )
        try:
            with trio.fail_after(10):
                resp = await rpc.call(
                    M_RELAY,
                    federation_pb2.RelayEnqueueRequest(envelopes=[env], origins=[b"\x01" * 32]),
                    federation_pb2.RelayEnqueueResponse,
                )
        except (QpcError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            out["relay"] = f"refused: {type(exc).__name__}: {exc}"
        except trio.TooSlowError:
            out["relay"] = "refused: no answer"
        else:
            out["relay"] = "accepted: " + ",".join(str(r.status) for r in resp.results)
    return out


class _AnyServer(ClientTLS):
    def __init__(self) -> None:
        self.alpn = ALPN_FEDERATION
        self.pin = None
        self.ca = None
        self.credentials = None
        self.server_name = None

    def check_server_certificate(self, chain_der: object) -> None:
        return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("recipient")
    p.add_argument("case", choices=["nocert", "selfsigned"])
    p.add_argument("--bind", type=int, default=0)
    a = p.parse_args()
    result = trio.run(attempt, a.host, a.port, bytes.fromhex(a.recipient), a.case, a.bind)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

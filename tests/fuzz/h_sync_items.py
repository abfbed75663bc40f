"""Inventory sync, scope 2: the item parser (storefwd/sources.py ``parse_item``) that
every held envelope and receipt a neighbour pushes or returns goes through before the
custody and receipt paths see it. Anything but a typed SyncItemError is a crash, and
what parses must carry exactly one envelope or one receipt with an expiry in range."""

from __future__ import annotations

from qpc_node.storefwd import receipts as rc
from qpc_node.storefwd.held import HoldPolicy
from qpc_node.storefwd.sources import HeldItem, SyncItemError, encode_receipt, parse_item
from qpc_node.storefwd.sync import KIND_HELD
from qpc_node.wire.gen.qpc.v1 import envelope_pb2, federation_pb2
from tests.fuzz.registry import Invariant, pure

NOW = 1_800_000_000_000
POLICY = HoldPolicy()


def _seeds() -> list[bytes]:
    env = envelope_pb2.Envelope(
        msg_id=b"\x01" * 16,
        recipient=b"\xcc" * 32,
        expiry_ms=NOW + 3_600_000,
        hop_limit=7,
        ciphertext=b"c" * 64,
    )
    req = federation_pb2.RelayEnqueueRequest(
        envelopes=[env], origins=[b"\xaa" * 32], origin_nodes=[b"\x0a" * 32], spray_tokens=[2]
    )
    receipt = rc.Receipt(b"\x01" * 16, b"\xcc" * 32, b"\x02" * 32, NOW, b"\x03" * 64)
    return [
        bytes((KIND_HELD,)) + req.SerializeToString(deterministic=True),
        encode_receipt(NOW + 3_600_000, receipt.to_proto().SerializeToString()),
        b"\x02" + b"\x00" * 8,
        b"\x01",
    ]


def _target(data: bytes) -> None:
    got = parse_item(data, NOW, POLICY)  # a SyncItemError is the typed refusal
    if isinstance(got, HeldItem):
        if len(got.request.envelopes) != 1:
            raise Invariant("a held item with other than one envelope")
    elif not NOW < got.expiry_ms <= NOW + POLICY.max_expiry_ahead_ms + 3_600_000:
        raise Invariant(f"a receipt item with expiry {got.expiry_ms} out of range")


pure("sync.held_items", seeds=_seeds, target=_target, allowed=(SyncItemError,))

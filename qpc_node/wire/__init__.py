"""Wire types: protobuf messages (generated under ``gen``) and their validated views."""

# ruff: noqa: E402  (the imports below must run after the deferring import above them)

from qpc_node.deferred_imports import import_protobuf_runtime

# Before any generated module imports protobuf (qpc_node/deferred_imports.py says why).
import_protobuf_runtime()

from qpc_node.wire.envelope import Envelope, pad, unpad

__all__ = ["Envelope", "pad", "unpad"]

"""Wire types: protobuf messages (generated under ``gen``) and their validated views."""

from qpc_node.wire.envelope import Envelope, pad, unpad

__all__ = ["Envelope", "pad", "unpad"]

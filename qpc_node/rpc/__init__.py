"""RPC over streams: one call = one bidirectional stream carrying one Request
and one Response frame (varint length-prefixed protobuf, proto/qpc/v1/rpc.proto).

Server: ``RpcServer(MethodTable)`` + ``handle_stream(conn_state, stream)``.
Client: ``RpcClient(open_stream).call(method, request, ResponseType)``.
Framing is a sans-IO core (``framing.FrameDecoder``).
"""

from qpc_node.rpc.client import NO_RETRY, RetryPolicy, RpcClient
from qpc_node.rpc.context import CallContext, PeerInfo, Session
from qpc_node.rpc.errors import RpcError
from qpc_node.rpc.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, encode_frame
from qpc_node.rpc.health import HEALTH_METHOD, HealthService
from qpc_node.rpc.methods import Method, MethodTable
from qpc_node.rpc.protocol import WIRE_VERSION
from qpc_node.rpc.server import RpcServer, ServerConfig, ServerConnection

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEALTH_METHOD",
    "NO_RETRY",
    "WIRE_VERSION",
    "CallContext",
    "FrameDecoder",
    "HealthService",
    "Method",
    "MethodTable",
    "PeerInfo",
    "RetryPolicy",
    "RpcClient",
    "RpcError",
    "RpcServer",
    "ServerConfig",
    "ServerConnection",
    "Session",
    "encode_frame",
]

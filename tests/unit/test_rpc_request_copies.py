"""While a handler runs, the server keeps only the decoded request body.

A 5 MiB request exists in turn as its frame, the parsed Request and the decoded
body. The server held all three for as long as the handler ran (the frame and
the Request were locals of the calling frames), so every large call in flight
cost three copies -- under the unread-Fetch attack the attackers' 5 MiB Enqueues
were the larger half of the peak. tracemalloc sees the frame (a Python bytes
object); protobuf's own arenas it does not, so this counts the frame alone.
"""

from __future__ import annotations

import tracemalloc

import trio
from google.protobuf.wrappers_pb2 import BytesValue

from qpc_node.rpc import CallContext, MethodTable, RpcServer, ServerConfig
from qpc_node.rpc.context import PeerInfo
from qpc_node.rpc.framing import FrameDecoder, encode_frame
from qpc_node.rpc.inmemory import MemoryConnection
from qpc_node.wire.gen.qpc.v1 import rpc_pb2

MIB = 1024 * 1024
SIZE = 4 * MIB


async def test_the_frame_is_gone_while_the_handler_runs() -> None:
    held: list[int] = []

    async def measure(req: BytesValue, ctx: CallContext) -> BytesValue:
        held.append(tracemalloc.get_traced_memory()[0])
        return BytesValue(value=b"ok")

    methods = MethodTable()
    methods.register("t.measure", BytesValue, BytesValue, measure)
    server = RpcServer(methods, ServerConfig(max_frame_size=6 * MIB))
    body = BytesValue(value=b"\x07" * SIZE).SerializeToString()
    request = rpc_pb2.Request(version=1, method="t.measure", call_id=7, body=body)
    frame = encode_frame(request.SerializeToString(), max_frame_size=6 * MIB)
    del body, request
    async with trio.open_nursery() as nursery:
        conn = MemoryConnection(server, nursery, PeerInfo("c1", ("10.0.0.1", 1)))
        stream = await conn.open_raw_stream()
        tracemalloc.start()  # the frame above is the client's: made before tracing
        try:
            await stream.send_all(frame)
            await stream.send_eof()
            got = b""
            while chunk := await stream.receive_some(65536):
                got += chunk
        finally:
            tracemalloc.stop()
        nursery.cancel_scope.cancel()
    response = rpc_pb2.Response()
    response.ParseFromString(FrameDecoder(6 * MIB).feed(got)[0])
    assert response.status == 0 and len(held) == 1
    assert held[0] < SIZE // 2, f"{held[0] / MIB:.1f} MiB traced in the handler"

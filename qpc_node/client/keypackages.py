"""KeyPackage upkeep: keep the user invitable on its node while it is offline.

The node keeps each uploaded KeyPackage for at most 24 h and hands each one out
once. The agent keeps between ``KP_LOW_WATER`` and ``KP_TARGET`` there, uploads
a fresh batch at half that lifetime, and keeps one last-resort package (handed
out again and again) so a user offline for longer than a day stays invitable.
"""

from __future__ import annotations

from qpc_node.client.agent_types import AgentContext
from qpc_node.wire.gen.qpc.v1 import service_pb2

KP_TARGET = 16
KP_LOW_WATER = 6
KP_ROTATE_MS = 12 * 3600 * 1000  # packages live 24 h on the node: refresh at half-life


async def top_up_key_packages(ctx: AgentContext) -> int:
    """Top the node's pool of our KeyPackages up; return how many it stored."""
    now = ctx.wall_ms()
    ident, state, st, rpc = ctx.ident, ctx.state, ctx.state.sync, ctx.rpc
    count = await rpc.call(
        "qpc.v1.Directory/Count",
        service_pb2.CountKeyPackagesRequest(),
        service_pb2.CountKeyPackagesResponse,
    )
    # Per node: after a move the new node has none of ours, the last-resort one included.
    node = ctx.node()
    key = "kp_uploaded_ms" + (f":{node.hex()}" if node else "")
    last = await state.call(st.get_meta, key)
    stale = last is None or now - int.from_bytes(last, "big") > KP_ROTATE_MS
    n = KP_TARGET if stale else (KP_TARGET - count.available)
    if not stale and count.available >= KP_LOW_WATER:
        return 0

    def make() -> list[service_pb2.KeyPackageUpload]:
        pkgs = [
            service_pb2.KeyPackageUpload(key_package=ident.key_package()) for _ in range(max(n, 0))
        ]
        if stale:
            pkgs.append(
                service_pb2.KeyPackageUpload(
                    key_package=ident.key_package(last_resort=True), last_resort=True
                )
            )
        return pkgs

    pkgs = await ctx.mls(make)
    if not pkgs:
        return 0
    resp = await rpc.call(
        "qpc.v1.Directory/Upload",
        service_pb2.UploadKeyPackagesRequest(packages=pkgs),
        service_pb2.UploadKeyPackagesResponse,
    )
    await state.call(st.set_meta, key, now.to_bytes(8, "big"))
    return int(resp.stored)

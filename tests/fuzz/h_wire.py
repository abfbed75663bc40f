"""Pure wire decoders: RPC framing, envelopes, padding."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.message import DecodeError

from qpc_node.errors import RemoteProtocolError
from qpc_node.repl.runner import format_mesh
from qpc_node.rpc.framing import FrameDecoder, encode_frame, encode_varint
from qpc_node.wire.envelope import Envelope, pad, unpad
from qpc_node.wire.gen.qpc.v1 import ops_pb2
from tests.fuzz.registry import Invariant, pure

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wire"
FRAME_CAP = 4096
"""Small cap so mutated length prefixes cross it often."""


def wire_fixtures(prefix: str = "") -> list[bytes]:
    """The golden wire fixtures (hex files) as seeds."""
    return [
        bytes.fromhex("".join(p.read_text().split()))
        for p in sorted(FIXTURES.glob(f"{prefix}*.hex"))
    ]


def _frame_seeds() -> list[bytes]:
    seeds = wire_fixtures("frame_")
    for n in (0, 1, 127, 128, 300, FRAME_CAP):
        seeds.append(encode_frame(bytes(range(256)) * (n // 256) + bytes(n % 256)))
    seeds.append(encode_frame(b"a") + encode_frame(b"bc") + encode_frame(b""))
    seeds.append(encode_varint(FRAME_CAP + 1))
    # First byte: chunking (high bit set: feed in chunks of (b % 17) + 1 bytes).
    return [b"\x00" + s for s in seeds] + [b"\x83" + s for s in seeds[::3]]


def decode_frames(data: bytes) -> str:
    """Feed in chunks chosen by the first byte; frames must re-encode to what was fed."""
    if not data:
        FrameDecoder(FRAME_CAP).close()
        return "empty"
    step = data[0] % 17 + 1 if data[0] & 0x80 else len(data)
    dec = FrameDecoder(FRAME_CAP)
    frames: list[bytes] = []
    body = data[1:]
    for i in range(0, len(body), step):
        frames += dec.feed(body[i : i + step])
        held = dec.buffered_bytes
        if held > FRAME_CAP + 10 + step:
            raise Invariant(f"decoder holds {held} bytes, cap {FRAME_CAP}")
    consumed = b"".join(encode_frame(f, max_frame_size=FRAME_CAP) for f in frames)
    if body[: len(consumed)] != consumed:
        raise Invariant("decoded frames do not re-encode to the input prefix")
    dec.close()
    if consumed != body:
        raise Invariant("close() accepted a stream with unconsumed bytes")
    return f"frames={min(len(frames), 3)}"


def _envelope_seeds() -> list[bytes]:
    base = Envelope(b"m" * 16, b"r" * 32, 1_700_000_000_000, 8, pad(b"hello"))
    return [
        base.encode(),
        Envelope(b"\0" * 16, b"\xff" * 32, 1, 0, b"x").encode(),
        Envelope(b"i" * 16, b"j" * 32, 2**63 - 1, 16, pad(b"y" * 600)).encode(),
    ]


def decode_envelope(data: bytes) -> str:
    env = Envelope.decode(data)
    if Envelope.decode(env.encode()) != env:
        raise Invariant("envelope does not round-trip")
    return "valid"


def unpad_target(data: bytes) -> str:
    out = unpad(data)
    n = int.from_bytes(data[:4], "big")
    if out != data[4 : 4 + n]:
        raise Invariant("unpad returned the wrong slice")
    return "valid"


def mesh_view(data: bytes) -> str:
    """A Node/Mesh answer from a node (one a user pointed /mesh server at is not trusted)
    as the REPL shows it: nothing but printable text and the table's own line breaks, one
    line per peer or route plus the head and the mDNS line."""
    resp = ops_pb2.MeshResponse.FromString(data)
    for what, rows in (("peers", len(resp.peers)), ("routes", len(resp.routes))):
        shown = format_mesh(resp, what)
        if any(not c.isprintable() for c in shown.replace("\n", "")):
            raise Invariant(f"/mesh {what} would print a control character: {shown[:200]!r}")
        if resp.on_mesh:
            extra = 1 if what == "peers" and resp.HasField("discovery") else 0
            if len(shown.splitlines()) != 1 + extra + max(rows, 1):
                raise Invariant(f"/mesh {what}: {len(shown.splitlines())} lines for {rows} rows")
    return f"on_mesh={resp.on_mesh} discovery={resp.HasField('discovery')}"


pure(
    "framing.decode",
    seeds=_frame_seeds,
    target=decode_frames,
    allowed=(RemoteProtocolError,),
)
pure(
    "envelope.decode",
    seeds=_envelope_seeds,
    target=decode_envelope,
    allowed=(RemoteProtocolError,),
)
pure(
    "envelope.unpad",
    seeds=lambda: [pad(b""), pad(b"hi"), pad(b"z" * 300), pad(b"q" * 252)],
    target=unpad_target,
    allowed=(RemoteProtocolError,),
)
pure(
    "repl.mesh_view",
    seeds=lambda: wire_fixtures("msg_mesh_response"),
    target=mesh_view,
    allowed=(DecodeError,),
)

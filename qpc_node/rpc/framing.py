"""Sans-IO framing of RPC streams: varint length-prefixed frames.

A frame is ``varint(len(payload)) || payload`` with the protobuf base-128
varint in its minimal form. The decoder is fed whatever bytes the transport
delivered and hands back complete payloads; it never touches I/O or clocks,
so every chunking and every malformed input can be tested without a network.

Memory is the point: the length prefix is checked against the frame cap *as
soon as it is known* (even before it is complete), so a peer announcing a
4 GiB frame is refused after a few bytes instead of after we buffered them.
The decoder therefore holds at most ``header_limit + max_frame_size`` bytes
plus the tail of the last ``feed`` chunk.
"""

from __future__ import annotations

import msgspec

from qpc_node.errors import LocalProtocolError, RemoteProtocolError, StatusCode

DEFAULT_MAX_FRAME_SIZE = 5 * 1024 * 1024
"""Default frame cap (5 MiB, the policy payload cap)."""


def varint_size(value: int) -> int:
    """Bytes the minimal varint encoding of ``value`` takes."""
    if value < 0:
        raise LocalProtocolError(f"varint of a negative number: {value}")
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def encode_varint(value: int) -> bytes:
    """Minimal protobuf base-128 varint (little-endian groups of 7 bits)."""
    if value < 0:
        raise LocalProtocolError(f"varint of a negative number: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_frame(payload: bytes, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Prefix ``payload`` with its length; refuse what the peer would refuse.

    Sending an oversize frame is *our* mistake (LocalProtocolError), caught
    here so we never make the peer tear the stream down for it.
    """
    return encode_frame_header(len(payload), max_frame_size=max_frame_size) + payload


def encode_frame_header(size: int, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """The length prefix of a ``size``-byte frame (checked as :func:`encode_frame`).

    For a sender that writes prefix and payload separately: joining them
    would copy a 5 MiB payload once more just to prepend a few bytes.
    """
    if size > max_frame_size:
        raise LocalProtocolError(
            f"frame of {size} bytes exceeds the cap of {max_frame_size}",
            code=StatusCode.PAYLOAD_TOO_LARGE,
        )
    return encode_varint(size)


class DecoderStatistics(msgspec.Struct, frozen=True):
    """What a decoder holds and has seen; ``buffered_bytes`` is the memory bound to watch."""

    buffered_bytes: int
    peak_buffered_bytes: int
    frames_decoded: int
    bytes_fed: int
    max_frame_size: int


class FrameDecoder:
    """Turns a byte stream into frame payloads; errors are typed and sticky.

    After an error the decoder stays failed (every later call raises the same
    error): a stream with a framing error cannot be resynchronised, the caller
    answers with the error's code and closes the stream.
    """

    __slots__ = (
        "_buf",
        "_bytes_fed",
        "_error",
        "_frames",
        "_header_limit",
        "_max",
        "_need",
        "_peak",
    )

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size < 0:
            raise LocalProtocolError(f"max_frame_size must be >= 0, got {max_frame_size}")
        self._max = max_frame_size
        # A minimal varint of a value <= max never needs more bytes than this.
        self._header_limit = varint_size(max_frame_size)
        self._buf = bytearray()
        self._need = -1  # payload length of the frame being read, -1 = header not complete
        self._error: RemoteProtocolError | None = None
        self._frames = 0
        self._bytes_fed = 0
        self._peak = 0

    @property
    def max_frame_size(self) -> int:
        return self._max

    @property
    def buffered_bytes(self) -> int:
        """Bytes held, waiting for the rest of a frame."""
        return len(self._buf)

    @property
    def announced_frame_size(self) -> int | None:
        """Header plus payload bytes of the frame being assembled, once its length
        prefix is complete (None before that, and between frames).

        What a caller budgets for: the peer has announced it, the decoder will
        hold up to that much, and it is known after a few bytes.
        """
        if self._need < 0:
            return None
        return varint_size(self._need) + self._need

    def statistics(self) -> DecoderStatistics:
        return DecoderStatistics(
            buffered_bytes=len(self._buf),
            peak_buffered_bytes=self._peak,
            frames_decoded=self._frames,
            bytes_fed=self._bytes_fed,
            max_frame_size=self._max,
        )

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes; return every frame they complete, in order.

        Raises RemoteProtocolError with PAYLOAD_TOO_LARGE when a length prefix
        exceeds the cap, INVALID_ARGUMENT when it is malformed.
        """
        if self._error is not None:
            raise self._error
        self._bytes_fed += len(data)
        self._buf += data
        if len(self._buf) > self._peak:
            self._peak = len(self._buf)
        frames: list[bytes] = []
        while True:
            if self._need < 0:
                header = self._parse_header()
                if header is None:
                    break
                length, used = header
                del self._buf[:used]
                self._need = length
            if len(self._buf) < self._need:
                break
            frames.append(self._take(self._need))
            self._need = -1
            self._frames += 1
        return frames

    def _take(self, n: int) -> bytes:
        """The first ``n`` buffered bytes as one copy (slicing first would make two:
        for a 5 MiB frame that is 5 MiB less at the peak)."""
        if n == len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
            return out
        with memoryview(self._buf) as view, view[:n] as head:
            out = bytes(head)
        del self._buf[:n]
        return out

    def close(self) -> None:
        """Signal end of input; raises INVALID_ARGUMENT if a frame was cut short."""
        if self._error is not None:
            raise self._error
        if self._buf or self._need >= 0:
            held = len(self._buf)
            want = "header" if self._need < 0 else f"{self._need}-byte payload"
            self._fail(
                RemoteProtocolError(
                    f"truncated frame: stream ended with {held} bytes of a {want}",
                    code=StatusCode.INVALID_ARGUMENT,
                )
            )

    def _parse_header(self) -> tuple[int, int] | None:
        """(payload length, header bytes) once the varint is complete, else None."""
        value = 0
        shift = 0
        buf = self._buf
        for index in range(min(len(buf), self._header_limit + 1)):
            byte = buf[index]
            value |= (byte & 0x7F) << shift
            if value > self._max:
                self._fail(
                    RemoteProtocolError(
                        f"frame length exceeds the cap of {self._max} bytes",
                        code=StatusCode.PAYLOAD_TOO_LARGE,
                    )
                )
            if not byte & 0x80:
                if byte == 0 and index > 0:
                    self._fail(
                        RemoteProtocolError(
                            "frame length is not a minimal varint",
                            code=StatusCode.INVALID_ARGUMENT,
                        )
                    )
                return value, index + 1
            shift += 7
            if index + 1 > self._header_limit:
                break
        if len(buf) > self._header_limit:
            # Only zero continuation groups can get here (a larger value was
            # refused above): an overlong encoding, not a big frame.
            self._fail(
                RemoteProtocolError(
                    "frame length varint is too long", code=StatusCode.INVALID_ARGUMENT
                )
            )
        return None

    def _fail(self, error: RemoteProtocolError) -> None:
        self._error = error
        self._buf.clear()
        raise error

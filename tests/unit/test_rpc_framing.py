"""The sans-IO frame decoder: sizes refused early, truncation and garbage typed."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpc_node.errors import LocalProtocolError, RemoteProtocolError, StatusCode
from qpc_node.rpc.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    encode_frame,
    encode_varint,
    varint_size,
)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (DEFAULT_MAX_FRAME_SIZE, b"\x80\x80\xc0\x02"),
    ],
)
def test_varint_matches_protobuf_encoding(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded
    assert varint_size(value) == len(encoded)


def test_frames_split_anywhere_decode_whole() -> None:
    stream = encode_frame(b"hello") + encode_frame(b"") + encode_frame(b"x" * 300)
    decoder = FrameDecoder()
    got = [f for byte in stream for f in decoder.feed(bytes([byte]))]
    assert got == [b"hello", b"", b"x" * 300]
    assert decoder.buffered_bytes == 0
    decoder.close()  # clean end: nothing pending
    assert decoder.statistics().frames_decoded == 3


def test_oversize_length_refused_before_the_body_arrives() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(encode_varint(1001))
    assert info.value.code is StatusCode.PAYLOAD_TOO_LARGE
    assert decoder.buffered_bytes == 0


def test_huge_length_refused_from_its_first_bytes() -> None:
    """A 4 GiB announcement is refused as soon as its prefix exceeds the cap."""
    decoder = FrameDecoder()  # 5 MiB cap: 4 header bytes at most
    header = encode_varint(4 * 2**30)
    fed = 0
    with pytest.raises(RemoteProtocolError) as info:
        for byte in header:
            fed += 1
            decoder.feed(bytes([byte]))
    assert info.value.code is StatusCode.PAYLOAD_TOO_LARGE
    # Never more header bytes than a cap-sized length needs, plus the one that overflows it.
    assert fed <= varint_size(DEFAULT_MAX_FRAME_SIZE) + 1
    assert decoder.statistics().peak_buffered_bytes <= varint_size(DEFAULT_MAX_FRAME_SIZE) + 1


@pytest.mark.parametrize(
    "header",
    [b"\x80\x00", b"\x80\x80\x80\x80\x80\x80", b"\x81\x00"],
    ids=["non-minimal", "endless-zero-groups", "trailing-zero"],
)
def test_malformed_length_is_invalid_argument(header: bytes) -> None:
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(header)
    assert info.value.code is StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("stream", [b"\x85", encode_frame(b"abcdef")[:-2]], ids=["header", "body"])
def test_truncated_frame_is_invalid_argument_at_close(stream: bytes) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(stream) == []
    with pytest.raises(RemoteProtocolError) as info:
        decoder.close()
    assert info.value.code is StatusCode.INVALID_ARGUMENT
    assert "truncated" in info.value.message


def test_errors_are_sticky() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"\x0b")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(encode_frame(b"ok"))
    assert info.value.code is StatusCode.PAYLOAD_TOO_LARGE


def test_sending_oversize_is_our_error() -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(b"x" * 11, max_frame_size=10)
    assert info.value.code is StatusCode.PAYLOAD_TOO_LARGE
    assert encode_frame(b"x" * 10, max_frame_size=10)[0] == 10


# -- properties -------------------------------------------------------------

CAP = 4096
payloads = st.lists(st.binary(max_size=600), max_size=8)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=150, deadline=None)
@given(frames=payloads, data=st.data())
def test_any_chunking_decodes_identically(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(f, max_frame_size=CAP) for f in frames)
    decoder = FrameDecoder(max_frame_size=CAP)
    got: list[bytes] = []
    for chunk in data.draw(chunked(stream)):
        got.extend(decoder.feed(chunk))
    decoder.close()
    assert got == frames


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=10))
def test_random_bytes_raise_only_remote_protocol_errors(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame_size=256)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            # Bounded: one frame in progress plus the tail of the last chunk.
            assert decoder.buffered_bytes <= 256 + varint_size(256) + 64
        decoder.close()
    except RemoteProtocolError as exc:
        assert exc.code in {StatusCode.INVALID_ARGUMENT, StatusCode.PAYLOAD_TOO_LARGE}

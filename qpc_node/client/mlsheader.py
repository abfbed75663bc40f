"""The clear header of an MLS handshake/application message: group id and epoch.

Why the agent reads it: the MLS core answers ``WrongEpoch`` both for a message
from an epoch we left (never decryptable again: invalid) and for one from an
epoch we have not reached yet (its commit is still on the way: keep it and retry).
RFC 9420 puts ``group_id`` and ``epoch`` in clear at the start of both
PublicMessage (inside FramedContent) and PrivateMessage, so a few bytes tell
the two apart without touching any key.

    MLSMessage   = version(uint16 = 1) wire_format(uint16) body
    body (1, 2)  = group_id<V> epoch(uint64) ...
    body (2)     = group_id<V> epoch(uint64) content_type(uint8) ...

A PrivateMessage also shows its content type (application, proposal, commit) in
clear right after the epoch: the inbox holds application messages of a group it
cannot name yet without decrypting them.

``<V>`` is the RFC 9420 variable-length integer (2.1.2): the top two bits of the
first byte give its length (1, 2 or 4 bytes; 0b11 is invalid), minimal form.
"""

from __future__ import annotations

import msgspec

from qpc_node.errors import RemoteProtocolError

MLS10 = 1
PUBLIC_MESSAGE = 1
PRIVATE_MESSAGE = 2
APPLICATION = 1
"""RFC 9420 ContentType application(1); proposal(2), commit(3)."""
MAX_GROUP_ID = 255
"""Longer group ids are refused: ours are 16-32 bytes, and the bound keeps this parser
from reading a multi-megabyte "length" out of garbage."""


class InvalidMlsHeader(RemoteProtocolError):
    """The bytes are not an MLS public or private message header."""


class MlsHeader(msgspec.Struct, frozen=True):
    wire_format: int
    group_id: bytes
    epoch: int
    content_type: int | None = None
    """A PrivateMessage's content type; None for a PublicMessage (not parsed)."""

    @property
    def application(self) -> bool:
        return self.content_type == APPLICATION


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise InvalidMlsHeader("truncated length")
    first = data[pos]
    size = 1 << (first >> 6)
    if size == 8:
        raise InvalidMlsHeader("invalid variable-length integer prefix 0b11")
    if pos + size > len(data):
        raise InvalidMlsHeader("truncated length")
    value = first & 0x3F
    for b in data[pos + 1 : pos + size]:
        value = (value << 8) | b
    if size > 1 and value < (1 << (8 * (size // 2) - 2)):
        raise InvalidMlsHeader("length not in minimal form")
    return value, pos + size


def parse_header(data: bytes) -> MlsHeader:
    """Group id and epoch of an MLSMessage carrying a Public- or PrivateMessage."""
    if len(data) < 4:
        raise InvalidMlsHeader("too short for an MLS message")
    version = int.from_bytes(data[0:2], "big")
    wire_format = int.from_bytes(data[2:4], "big")
    if version != MLS10:
        raise InvalidMlsHeader(f"unknown MLS version {version}")
    if wire_format not in (PUBLIC_MESSAGE, PRIVATE_MESSAGE):
        raise InvalidMlsHeader(f"wire format {wire_format} has no epoch header")
    length, pos = _varint(data, 4)
    if length > MAX_GROUP_ID:
        raise InvalidMlsHeader(f"group id of {length} bytes")
    end = pos + length
    if end + 8 > len(data):
        raise InvalidMlsHeader("truncated group id or epoch")
    epoch = int.from_bytes(data[end : end + 8], "big")
    if wire_format != PRIVATE_MESSAGE:
        return MlsHeader(wire_format, data[pos:end], epoch)
    if end + 9 > len(data):
        raise InvalidMlsHeader("truncated content type")
    return MlsHeader(wire_format, data[pos:end], epoch, data[end + 8])

"""Wire constants and the small pure helpers both sides share.

No I/O: building and checking ``Request``/``Response`` frames only.
"""

from __future__ import annotations

import re
from typing import cast

from qpc_node.errors import RemoteProtocolError, StatusCode
from qpc_node.wire.gen.qpc.v1 import rpc_pb2

WIRE_VERSION = 1
"""The version this node writes into every frame."""

SUPPORTED_VERSIONS = frozenset({WIRE_VERSION})

MAX_MESSAGE_CHARS = 512
"""Status messages are cut to this length: they are for humans, not payloads."""

_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")


def status_from_wire(value: int) -> StatusCode:
    """A wire status as our enum; numbers we do not know become UNKNOWN."""
    try:
        return StatusCode(value)
    except ValueError:
        return StatusCode.UNKNOWN


def valid_correlation_id(value: str) -> bool:
    """Correlation ids end up in logs: only a short, inert alphabet is allowed."""
    return _CORRELATION_ID.fullmatch(value) is not None


def clip_message(message: str) -> str:
    return (
        message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."
    )


def error_response(code: StatusCode, message: str, *, call_id: int = 0) -> rpc_pb2.Response:
    return rpc_pb2.Response(
        version=WIRE_VERSION,
        call_id=call_id,
        status=cast(rpc_pb2.StatusCode, int(code)),
        message=clip_message(message),
    )


def check_version(version: int) -> None:
    if version not in SUPPORTED_VERSIONS:
        supported = ",".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
        raise RemoteProtocolError(
            f"unsupported wire version {version} (supported: {supported})",
            code=StatusCode.UNSUPPORTED_VERSION,
        )

"""The dispatch table: method name -> typed async handler.

Handlers are registered with their request and response protobuf types so
the dispatcher, not each handler, decodes the body, refuses garbage with
INVALID_ARGUMENT and checks what the handler returns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import msgspec
from google.protobuf.message import Message

from qpc_node.errors import LocalProtocolError
from qpc_node.rpc.context import CallContext

ReqT = TypeVar("ReqT", bound=Message)
RespT = TypeVar("RespT", bound=Message)


class Method(msgspec.Struct, Generic[ReqT, RespT], frozen=True):
    """One registered method.

    ``max_timeout`` caps the caller's deadline for this method (a long-poll
    gets a longer cap than a lookup); None means the server's cap.
    """

    name: str
    request_type: type[ReqT]
    response_type: type[RespT]
    handler: Callable[[ReqT, CallContext], Awaitable[RespT]]
    max_timeout: float | None = None


class MethodTable:
    """Names are unique; registering twice is a programming error, not an override."""

    def __init__(self) -> None:
        self._methods: dict[str, Method[Any, Any]] = {}

    def register(
        self,
        name: str,
        request_type: type[ReqT],
        response_type: type[RespT],
        handler: Callable[[ReqT, CallContext], Awaitable[RespT]],
        *,
        max_timeout: float | None = None,
    ) -> None:
        if not name or name in self._methods:
            raise LocalProtocolError(f"method name empty or already registered: {name!r}")
        if max_timeout is not None and max_timeout <= 0:
            raise LocalProtocolError(f"max_timeout must be > 0, got {max_timeout}")
        self._methods[name] = Method(name, request_type, response_type, handler, max_timeout)

    def get(self, name: str) -> Method[Any, Any] | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __len__(self) -> int:
        return len(self._methods)

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Request(_message.Message):
    __slots__ = ("version", "method", "call_id", "body")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    version: int
    method: str
    call_id: int
    body: bytes
    def __init__(self, version: _Optional[int] = ..., method: _Optional[str] = ..., call_id: _Optional[int] = ..., body: _Optional[bytes] = ...) -> None: ...

class Response(_message.Message):
    __slots__ = ("version", "call_id", "body")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    version: int
    call_id: int
    body: bytes
    def __init__(self, version: _Optional[int] = ..., call_id: _Optional[int] = ..., body: _Optional[bytes] = ...) -> None: ...

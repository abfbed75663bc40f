from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouteAnnouncement(_message.Message):
    __slots__ = ("origin", "origin_key", "seq", "expiry_ms", "signature", "hops")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_KEY_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    origin: bytes
    origin_key: bytes
    seq: int
    expiry_ms: int
    signature: bytes
    hops: int
    def __init__(self, origin: _Optional[bytes] = ..., origin_key: _Optional[bytes] = ..., seq: _Optional[int] = ..., expiry_ms: _Optional[int] = ..., signature: _Optional[bytes] = ..., hops: _Optional[int] = ...) -> None: ...

class HomeBinding(_message.Message):
    __slots__ = ("user", "user_key", "node", "seq", "expiry_ms", "signature")
    USER_FIELD_NUMBER: _ClassVar[int]
    USER_KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    user: bytes
    user_key: bytes
    node: bytes
    seq: int
    expiry_ms: int
    signature: bytes
    def __init__(self, user: _Optional[bytes] = ..., user_key: _Optional[bytes] = ..., node: _Optional[bytes] = ..., seq: _Optional[int] = ..., expiry_ms: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SeqRequest(_message.Message):
    __slots__ = ("origin", "seq", "hop_limit")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HOP_LIMIT_FIELD_NUMBER: _ClassVar[int]
    origin: bytes
    seq: int
    hop_limit: int
    def __init__(self, origin: _Optional[bytes] = ..., seq: _Optional[int] = ..., hop_limit: _Optional[int] = ...) -> None: ...

class RouteUpdate(_message.Message):
    __slots__ = ("routes", "bindings", "requests")
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[RouteAnnouncement]
    bindings: _containers.RepeatedCompositeFieldContainer[HomeBinding]
    requests: _containers.RepeatedCompositeFieldContainer[SeqRequest]
    def __init__(self, routes: _Optional[_Iterable[_Union[RouteAnnouncement, _Mapping]]] = ..., bindings: _Optional[_Iterable[_Union[HomeBinding, _Mapping]]] = ..., requests: _Optional[_Iterable[_Union[SeqRequest, _Mapping]]] = ...) -> None: ...

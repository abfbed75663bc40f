from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SyncScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SYNC_SCOPE_UNSPECIFIED: _ClassVar[SyncScope]
    SYNC_SCOPE_CHANNELS: _ClassVar[SyncScope]
    SYNC_SCOPE_HELD: _ClassVar[SyncScope]
SYNC_SCOPE_UNSPECIFIED: SyncScope
SYNC_SCOPE_CHANNELS: SyncScope
SYNC_SCOPE_HELD: SyncScope

class SyncRefusal(_message.Message):
    __slots__ = ("reason", "retry_after_ms")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[SyncRefusal.Reason]
        RATE_LIMITED: _ClassVar[SyncRefusal.Reason]
        BUSY: _ClassVar[SyncRefusal.Reason]
        UNKNOWN_SCOPE: _ClassVar[SyncRefusal.Reason]
        UNKNOWN_SESSION: _ClassVar[SyncRefusal.Reason]
        TOO_MANY_ROUNDS: _ClassVar[SyncRefusal.Reason]
        TOO_LARGE: _ClassVar[SyncRefusal.Reason]
        MALFORMED: _ClassVar[SyncRefusal.Reason]
        TOO_MANY_IDS: _ClassVar[SyncRefusal.Reason]
    REASON_UNSPECIFIED: SyncRefusal.Reason
    RATE_LIMITED: SyncRefusal.Reason
    BUSY: SyncRefusal.Reason
    UNKNOWN_SCOPE: SyncRefusal.Reason
    UNKNOWN_SESSION: SyncRefusal.Reason
    TOO_MANY_ROUNDS: SyncRefusal.Reason
    TOO_LARGE: SyncRefusal.Reason
    MALFORMED: SyncRefusal.Reason
    TOO_MANY_IDS: SyncRefusal.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    reason: SyncRefusal.Reason
    retry_after_ms: int
    def __init__(self, reason: _Optional[_Union[SyncRefusal.Reason, str]] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("session_id", "scope", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    scope: SyncScope
    message: bytes
    def __init__(self, session_id: _Optional[bytes] = ..., scope: _Optional[_Union[SyncScope, str]] = ..., message: _Optional[bytes] = ...) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ("message", "refusal")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    message: bytes
    refusal: SyncRefusal
    def __init__(self, message: _Optional[bytes] = ..., refusal: _Optional[_Union[SyncRefusal, _Mapping]] = ...) -> None: ...

class SyncFetchRequest(_message.Message):
    __slots__ = ("session_id", "scope", "ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    scope: SyncScope
    ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[bytes] = ..., scope: _Optional[_Union[SyncScope, str]] = ..., ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SyncFetchResponse(_message.Message):
    __slots__ = ("items", "refusal")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedScalarFieldContainer[bytes]
    refusal: SyncRefusal
    def __init__(self, items: _Optional[_Iterable[bytes]] = ..., refusal: _Optional[_Union[SyncRefusal, _Mapping]] = ...) -> None: ...

class SyncPushRequest(_message.Message):
    __slots__ = ("session_id", "scope", "items")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    scope: SyncScope
    items: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[bytes] = ..., scope: _Optional[_Union[SyncScope, str]] = ..., items: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SyncPushResponse(_message.Message):
    __slots__ = ("accepted", "refusal")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    refusal: SyncRefusal
    def __init__(self, accepted: _Optional[int] = ..., refusal: _Optional[_Union[SyncRefusal, _Mapping]] = ...) -> None: ...

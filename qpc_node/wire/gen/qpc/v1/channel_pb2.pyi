from qpc_node.wire.gen.qpc.v1 import rpc_pb2 as _rpc_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChannelMessage(_message.Message):
    __slots__ = ("channel_id", "msg_id", "expiry_ms", "hop_limit", "sealed")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_MS_FIELD_NUMBER: _ClassVar[int]
    HOP_LIMIT_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    channel_id: bytes
    msg_id: bytes
    expiry_ms: int
    hop_limit: int
    sealed: bytes
    def __init__(self, channel_id: _Optional[bytes] = ..., msg_id: _Optional[bytes] = ..., expiry_ms: _Optional[int] = ..., hop_limit: _Optional[int] = ..., sealed: _Optional[bytes] = ...) -> None: ...

class ChannelPlaintext(_message.Message):
    __slots__ = ("sender_key", "created_ms", "body", "signature")
    SENDER_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    sender_key: bytes
    created_ms: int
    body: str
    signature: bytes
    def __init__(self, sender_key: _Optional[bytes] = ..., created_ms: _Optional[int] = ..., body: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ChannelPublishRequest(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: ChannelMessage
    def __init__(self, message: _Optional[_Union[ChannelMessage, _Mapping]] = ...) -> None: ...

class ChannelPublishResponse(_message.Message):
    __slots__ = ("status", "detail", "duplicate", "seq")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    status: _rpc_pb2.StatusCode
    detail: str
    duplicate: bool
    seq: int
    def __init__(self, status: _Optional[_Union[_rpc_pb2.StatusCode, str]] = ..., detail: _Optional[str] = ..., duplicate: _Optional[bool] = ..., seq: _Optional[int] = ...) -> None: ...

class ChannelCursor(_message.Message):
    __slots__ = ("channel_id", "after_seq")
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    channel_id: bytes
    after_seq: int
    def __init__(self, channel_id: _Optional[bytes] = ..., after_seq: _Optional[int] = ...) -> None: ...

class ChannelFetchRequest(_message.Message):
    __slots__ = ("cursors", "limit", "wait_ms")
    CURSORS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    cursors: _containers.RepeatedCompositeFieldContainer[ChannelCursor]
    limit: int
    wait_ms: int
    def __init__(self, cursors: _Optional[_Iterable[_Union[ChannelCursor, _Mapping]]] = ..., limit: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class StoredChannelMessage(_message.Message):
    __slots__ = ("seq", "message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    message: ChannelMessage
    def __init__(self, seq: _Optional[int] = ..., message: _Optional[_Union[ChannelMessage, _Mapping]] = ...) -> None: ...

class ChannelFetchResponse(_message.Message):
    __slots__ = ("messages", "more")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[StoredChannelMessage]
    more: bool
    def __init__(self, messages: _Optional[_Iterable[_Union[StoredChannelMessage, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

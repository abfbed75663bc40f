from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GossipRequest(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[GossipFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[GossipFrame, _Mapping]]] = ...) -> None: ...

class GossipResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GossipFrame(_message.Message):
    __slots__ = ("push", "ihave", "graft", "prune", "ack")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    IHAVE_FIELD_NUMBER: _ClassVar[int]
    GRAFT_FIELD_NUMBER: _ClassVar[int]
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    push: GossipPush
    ihave: GossipIHave
    graft: GossipGraft
    prune: GossipPrune
    ack: GossipAck
    def __init__(self, push: _Optional[_Union[GossipPush, _Mapping]] = ..., ihave: _Optional[_Union[GossipIHave, _Mapping]] = ..., graft: _Optional[_Union[GossipGraft, _Mapping]] = ..., prune: _Optional[_Union[GossipPrune, _Mapping]] = ..., ack: _Optional[_Union[GossipAck, _Mapping]] = ...) -> None: ...

class GossipPush(_message.Message):
    __slots__ = ("msg_id", "hops", "payload")
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    msg_id: bytes
    hops: int
    payload: bytes
    def __init__(self, msg_id: _Optional[bytes] = ..., hops: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class GossipIHaveEntry(_message.Message):
    __slots__ = ("msg_id", "hops")
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    msg_id: bytes
    hops: int
    def __init__(self, msg_id: _Optional[bytes] = ..., hops: _Optional[int] = ...) -> None: ...

class GossipIHave(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[GossipIHaveEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[GossipIHaveEntry, _Mapping]]] = ...) -> None: ...

class GossipGraft(_message.Message):
    __slots__ = ("msg_ids",)
    MSG_IDS_FIELD_NUMBER: _ClassVar[int]
    msg_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, msg_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GossipPrune(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GossipAck(_message.Message):
    __slots__ = ("msg_ids",)
    MSG_IDS_FIELD_NUMBER: _ClassVar[int]
    msg_ids: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, msg_ids: _Optional[_Iterable[bytes]] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sealed(_message.Message):
    __slots__ = ("kind", "group_id", "data", "describes", "branch")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Sealed.Kind]
        MLS_MESSAGE: _ClassVar[Sealed.Kind]
        WELCOME: _ClassVar[Sealed.Kind]
        REJOIN_OFFER: _ClassVar[Sealed.Kind]
    KIND_UNSPECIFIED: Sealed.Kind
    MLS_MESSAGE: Sealed.Kind
    WELCOME: Sealed.Kind
    REJOIN_OFFER: Sealed.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DESCRIBES_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    kind: Sealed.Kind
    group_id: bytes
    data: bytes
    describes: bool
    branch: bytes
    def __init__(self, kind: _Optional[_Union[Sealed.Kind, str]] = ..., group_id: _Optional[bytes] = ..., data: _Optional[bytes] = ..., describes: _Optional[bool] = ..., branch: _Optional[bytes] = ...) -> None: ...

class AppMessage(_message.Message):
    __slots__ = ("text", "info", "leave", "intent", "pull", "catch_up", "sent_ms", "app_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_FIELD_NUMBER: _ClassVar[int]
    SENT_MS_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    info: GroupInfo
    leave: LeaveRequest
    intent: GroupIntent
    pull: CommitPull
    catch_up: CatchUp
    sent_ms: int
    app_id: bytes
    def __init__(self, text: _Optional[str] = ..., info: _Optional[_Union[GroupInfo, _Mapping]] = ..., leave: _Optional[_Union[LeaveRequest, _Mapping]] = ..., intent: _Optional[_Union[GroupIntent, _Mapping]] = ..., pull: _Optional[_Union[CommitPull, _Mapping]] = ..., catch_up: _Optional[_Union[CatchUp, _Mapping]] = ..., sent_ms: _Optional[int] = ..., app_id: _Optional[bytes] = ...) -> None: ...

class GroupInfo(_message.Message):
    __slots__ = ("name", "direct", "committer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    COMMITTER_FIELD_NUMBER: _ClassVar[int]
    name: str
    direct: bool
    committer: bytes
    def __init__(self, name: _Optional[str] = ..., direct: _Optional[bool] = ..., committer: _Optional[bytes] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GroupIntent(_message.Message):
    __slots__ = ("intent_id", "kind", "target", "proposal_ref", "epoch")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[GroupIntent.Kind]
        ADD: _ClassVar[GroupIntent.Kind]
        REMOVE: _ClassVar[GroupIntent.Kind]
        UPDATE: _ClassVar[GroupIntent.Kind]
        LEAVE: _ClassVar[GroupIntent.Kind]
    KIND_UNSPECIFIED: GroupIntent.Kind
    ADD: GroupIntent.Kind
    REMOVE: GroupIntent.Kind
    UPDATE: GroupIntent.Kind
    LEAVE: GroupIntent.Kind
    INTENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_REF_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    intent_id: bytes
    kind: GroupIntent.Kind
    target: bytes
    proposal_ref: bytes
    epoch: int
    def __init__(self, intent_id: _Optional[bytes] = ..., kind: _Optional[_Union[GroupIntent.Kind, str]] = ..., target: _Optional[bytes] = ..., proposal_ref: _Optional[bytes] = ..., epoch: _Optional[int] = ...) -> None: ...

class CommitPull(_message.Message):
    __slots__ = ("from_epoch",)
    FROM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    from_epoch: int
    def __init__(self, from_epoch: _Optional[int] = ...) -> None: ...

class CatchUp(_message.Message):
    __slots__ = ("since",)
    SINCE_FIELD_NUMBER: _ClassVar[int]
    since: bytes
    def __init__(self, since: _Optional[bytes] = ...) -> None: ...

class BranchOffer(_message.Message):
    __slots__ = ("tags", "steps", "content")
    TAGS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    tags: _containers.RepeatedScalarFieldContainer[bytes]
    steps: _containers.RepeatedScalarFieldContainer[bytes]
    content: bytes
    def __init__(self, tags: _Optional[_Iterable[bytes]] = ..., steps: _Optional[_Iterable[bytes]] = ..., content: _Optional[bytes] = ...) -> None: ...

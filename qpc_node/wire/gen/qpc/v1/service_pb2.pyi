from qpc_node.wire.gen.qpc.v1 import envelope_pb2 as _envelope_pb2
from qpc_node.wire.gen.qpc.v1 import mesh_pb2 as _mesh_pb2
from qpc_node.wire.gen.qpc.v1 import rpc_pb2 as _rpc_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuthChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuthChallengeResponse(_message.Message):
    __slots__ = ("nonce", "node_id")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    node_id: bytes
    def __init__(self, nonce: _Optional[bytes] = ..., node_id: _Optional[bytes] = ...) -> None: ...

class AuthProveRequest(_message.Message):
    __slots__ = ("public_key", "signature", "home")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    HOME_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    signature: bytes
    home: _mesh_pb2.HomeBinding
    def __init__(self, public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., home: _Optional[_Union[_mesh_pb2.HomeBinding, _Mapping]] = ...) -> None: ...

class AuthProveResponse(_message.Message):
    __slots__ = ("fingerprint",)
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: bytes
    def __init__(self, fingerprint: _Optional[bytes] = ...) -> None: ...

class KeyPackageUpload(_message.Message):
    __slots__ = ("key_package", "last_resort")
    KEY_PACKAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_RESORT_FIELD_NUMBER: _ClassVar[int]
    key_package: bytes
    last_resort: bool
    def __init__(self, key_package: _Optional[bytes] = ..., last_resort: _Optional[bool] = ...) -> None: ...

class UploadKeyPackagesRequest(_message.Message):
    __slots__ = ("packages",)
    PACKAGES_FIELD_NUMBER: _ClassVar[int]
    packages: _containers.RepeatedCompositeFieldContainer[KeyPackageUpload]
    def __init__(self, packages: _Optional[_Iterable[_Union[KeyPackageUpload, _Mapping]]] = ...) -> None: ...

class UploadKeyPackagesResponse(_message.Message):
    __slots__ = ("stored", "available")
    STORED_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    stored: int
    available: int
    def __init__(self, stored: _Optional[int] = ..., available: _Optional[int] = ...) -> None: ...

class FetchKeyPackageRequest(_message.Message):
    __slots__ = ("identity",)
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    identity: bytes
    def __init__(self, identity: _Optional[bytes] = ...) -> None: ...

class FetchKeyPackageResponse(_message.Message):
    __slots__ = ("key_package", "last_resort")
    KEY_PACKAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_RESORT_FIELD_NUMBER: _ClassVar[int]
    key_package: bytes
    last_resort: bool
    def __init__(self, key_package: _Optional[bytes] = ..., last_resort: _Optional[bool] = ...) -> None: ...

class CountKeyPackagesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CountKeyPackagesResponse(_message.Message):
    __slots__ = ("available",)
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    available: int
    def __init__(self, available: _Optional[int] = ...) -> None: ...

class EnqueueRequest(_message.Message):
    __slots__ = ("envelopes", "atomic")
    ENVELOPES_FIELD_NUMBER: _ClassVar[int]
    ATOMIC_FIELD_NUMBER: _ClassVar[int]
    envelopes: _containers.RepeatedCompositeFieldContainer[_envelope_pb2.Envelope]
    atomic: bool
    def __init__(self, envelopes: _Optional[_Iterable[_Union[_envelope_pb2.Envelope, _Mapping]]] = ..., atomic: _Optional[bool] = ...) -> None: ...

class EnqueueResult(_message.Message):
    __slots__ = ("msg_id", "seq", "duplicate", "status", "detail", "hops", "held")
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    msg_id: bytes
    seq: int
    duplicate: bool
    status: _rpc_pb2.StatusCode
    detail: str
    hops: int
    held: bool
    def __init__(self, msg_id: _Optional[bytes] = ..., seq: _Optional[int] = ..., duplicate: _Optional[bool] = ..., status: _Optional[_Union[_rpc_pb2.StatusCode, str]] = ..., detail: _Optional[str] = ..., hops: _Optional[int] = ..., held: _Optional[bool] = ...) -> None: ...

class EnqueueResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EnqueueResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EnqueueResult, _Mapping]]] = ...) -> None: ...

class StoredMessage(_message.Message):
    __slots__ = ("seq", "envelope")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    envelope: _envelope_pb2.Envelope
    def __init__(self, seq: _Optional[int] = ..., envelope: _Optional[_Union[_envelope_pb2.Envelope, _Mapping]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("after_seq", "limit", "wait_ms", "identity")
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    limit: int
    wait_ms: int
    identity: bytes
    def __init__(self, after_seq: _Optional[int] = ..., limit: _Optional[int] = ..., wait_ms: _Optional[int] = ..., identity: _Optional[bytes] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("messages", "head_seq")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[StoredMessage]
    head_seq: int
    def __init__(self, messages: _Optional[_Iterable[_Union[StoredMessage, _Mapping]]] = ..., head_seq: _Optional[int] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("up_to_seq", "identity")
    UP_TO_SEQ_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    up_to_seq: int
    identity: bytes
    def __init__(self, up_to_seq: _Optional[int] = ..., identity: _Optional[bytes] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

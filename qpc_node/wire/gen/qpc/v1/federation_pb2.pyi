from qpc_node.wire.gen.qpc.v1 import envelope_pb2 as _envelope_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RelayStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELAY_STATUS_UNSPECIFIED: _ClassVar[RelayStatus]
    RELAY_STORED_LOCAL: _ClassVar[RelayStatus]
    RELAY_QUEUED: _ClassVar[RelayStatus]
    RELAY_DUPLICATE: _ClassVar[RelayStatus]
    RELAY_HOP_LIMIT_EXCEEDED: _ClassVar[RelayStatus]
    RELAY_EXPIRED: _ClassVar[RelayStatus]
    RELAY_NO_ROUTE: _ClassVar[RelayStatus]
    RELAY_QUEUE_FULL: _ClassVar[RelayStatus]
    RELAY_INVALID: _ClassVar[RelayStatus]
    RELAY_LOOP: _ClassVar[RelayStatus]
    RELAY_REFUSED: _ClassVar[RelayStatus]
    RELAY_STRANGER_LIMIT: _ClassVar[RelayStatus]
    RELAY_MAILBOX_FULL: _ClassVar[RelayStatus]
    RELAY_HELD: _ClassVar[RelayStatus]
    RELAY_EXPIRY_TOO_FAR: _ClassVar[RelayStatus]
RELAY_STATUS_UNSPECIFIED: RelayStatus
RELAY_STORED_LOCAL: RelayStatus
RELAY_QUEUED: RelayStatus
RELAY_DUPLICATE: RelayStatus
RELAY_HOP_LIMIT_EXCEEDED: RelayStatus
RELAY_EXPIRED: RelayStatus
RELAY_NO_ROUTE: RelayStatus
RELAY_QUEUE_FULL: RelayStatus
RELAY_INVALID: RelayStatus
RELAY_LOOP: RelayStatus
RELAY_REFUSED: RelayStatus
RELAY_STRANGER_LIMIT: RelayStatus
RELAY_MAILBOX_FULL: RelayStatus
RELAY_HELD: RelayStatus
RELAY_EXPIRY_TOO_FAR: RelayStatus

class RelayEnqueueRequest(_message.Message):
    __slots__ = ("envelopes", "origins", "origin_nodes", "spray_tokens", "handover")
    ENVELOPES_FIELD_NUMBER: _ClassVar[int]
    ORIGINS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_NODES_FIELD_NUMBER: _ClassVar[int]
    SPRAY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_FIELD_NUMBER: _ClassVar[int]
    envelopes: _containers.RepeatedCompositeFieldContainer[_envelope_pb2.Envelope]
    origins: _containers.RepeatedScalarFieldContainer[bytes]
    origin_nodes: _containers.RepeatedScalarFieldContainer[bytes]
    spray_tokens: _containers.RepeatedScalarFieldContainer[int]
    handover: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, envelopes: _Optional[_Iterable[_Union[_envelope_pb2.Envelope, _Mapping]]] = ..., origins: _Optional[_Iterable[bytes]] = ..., origin_nodes: _Optional[_Iterable[bytes]] = ..., spray_tokens: _Optional[_Iterable[int]] = ..., handover: _Optional[_Iterable[bool]] = ...) -> None: ...

class RelayResult(_message.Message):
    __slots__ = ("msg_id", "status", "detail")
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    msg_id: bytes
    status: RelayStatus
    detail: str
    def __init__(self, msg_id: _Optional[bytes] = ..., status: _Optional[_Union[RelayStatus, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class RelayEnqueueResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RelayResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RelayResult, _Mapping]]] = ...) -> None: ...

class ProxyKeyPackageFetchRequest(_message.Message):
    __slots__ = ("identity",)
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    identity: bytes
    def __init__(self, identity: _Optional[bytes] = ...) -> None: ...

class ProxyKeyPackageFetchResponse(_message.Message):
    __slots__ = ("key_package", "last_resort")
    KEY_PACKAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_RESORT_FIELD_NUMBER: _ClassVar[int]
    key_package: bytes
    last_resort: bool
    def __init__(self, key_package: _Optional[bytes] = ..., last_resort: _Optional[bool] = ...) -> None: ...

class AnnounceRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class AnnounceResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("nonce", "boot_id", "carrier")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    CARRIER_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    boot_id: bytes
    carrier: bool
    def __init__(self, nonce: _Optional[int] = ..., boot_id: _Optional[bytes] = ..., carrier: _Optional[bool] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("nonce", "node_id", "relay_queue", "boot_id", "carrier")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RELAY_QUEUE_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    CARRIER_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    node_id: bytes
    relay_queue: int
    boot_id: bytes
    carrier: bool
    def __init__(self, nonce: _Optional[int] = ..., node_id: _Optional[bytes] = ..., relay_queue: _Optional[int] = ..., boot_id: _Optional[bytes] = ..., carrier: _Optional[bool] = ...) -> None: ...

class DeliveryReceipt(_message.Message):
    __slots__ = ("msg_id", "recipient", "home_key", "delivered_ms", "signature")
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    HOME_KEY_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_MS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    msg_id: bytes
    recipient: bytes
    home_key: bytes
    delivered_ms: int
    signature: bytes
    def __init__(self, msg_id: _Optional[bytes] = ..., recipient: _Optional[bytes] = ..., home_key: _Optional[bytes] = ..., delivered_ms: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ReceiptRequest(_message.Message):
    __slots__ = ("receipts",)
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    receipts: _containers.RepeatedCompositeFieldContainer[DeliveryReceipt]
    def __init__(self, receipts: _Optional[_Iterable[_Union[DeliveryReceipt, _Mapping]]] = ...) -> None: ...

class ReceiptResponse(_message.Message):
    __slots__ = ("taken",)
    TAKEN_FIELD_NUMBER: _ClassVar[int]
    taken: int
    def __init__(self, taken: _Optional[int] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatsRequest(_message.Message):
    __slots__ = ("histogram_buckets",)
    HISTOGRAM_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    histogram_buckets: bool
    def __init__(self, histogram_buckets: _Optional[bool] = ...) -> None: ...

class StatsSample(_message.Message):
    __slots__ = ("name", "labels", "value")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.ScalarMap[str, str]
    value: float
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., value: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[StatsSample]
    def __init__(self, samples: _Optional[_Iterable[_Union[StatsSample, _Mapping]]] = ...) -> None: ...

class MeshRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MeshPeer(_message.Message):
    __slots__ = ("node_id", "address", "state", "srtt_ms", "failures", "sources", "addresses", "hops", "users")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SRTT_MS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    node_id: bytes
    address: str
    state: str
    srtt_ms: float
    failures: int
    sources: _containers.RepeatedScalarFieldContainer[str]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    hops: int
    users: int
    def __init__(self, node_id: _Optional[bytes] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., srtt_ms: _Optional[float] = ..., failures: _Optional[int] = ..., sources: _Optional[_Iterable[str]] = ..., addresses: _Optional[_Iterable[str]] = ..., hops: _Optional[int] = ..., users: _Optional[int] = ...) -> None: ...

class MeshRoute(_message.Message):
    __slots__ = ("destination", "next_hop", "hops", "seq", "expires_ms", "users")
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOP_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_MS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    destination: bytes
    next_hop: bytes
    hops: int
    seq: int
    expires_ms: int
    users: int
    def __init__(self, destination: _Optional[bytes] = ..., next_hop: _Optional[bytes] = ..., hops: _Optional[int] = ..., seq: _Optional[int] = ..., expires_ms: _Optional[int] = ..., users: _Optional[int] = ...) -> None: ...

class MeshResponse(_message.Message):
    __slots__ = ("on_mesh", "node_id", "peers", "routes", "bindings", "discovery")
    ON_MESH_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    DISCOVERY_FIELD_NUMBER: _ClassVar[int]
    on_mesh: bool
    node_id: bytes
    peers: _containers.RepeatedCompositeFieldContainer[MeshPeer]
    routes: _containers.RepeatedCompositeFieldContainer[MeshRoute]
    bindings: int
    discovery: MeshDiscovery
    def __init__(self, on_mesh: _Optional[bool] = ..., node_id: _Optional[bytes] = ..., peers: _Optional[_Iterable[_Union[MeshPeer, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[MeshRoute, _Mapping]]] = ..., bindings: _Optional[int] = ..., discovery: _Optional[_Union[MeshDiscovery, _Mapping]] = ...) -> None: ...

class MeshDiscovery(_message.Message):
    __slots__ = ("running", "interfaces", "peers", "start_failures", "last_error", "announced")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    START_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCED_FIELD_NUMBER: _ClassVar[int]
    running: bool
    interfaces: _containers.RepeatedScalarFieldContainer[str]
    peers: int
    start_failures: int
    last_error: str
    announced: bool
    def __init__(self, running: _Optional[bool] = ..., interfaces: _Optional[_Iterable[str]] = ..., peers: _Optional[int] = ..., start_failures: _Optional[int] = ..., last_error: _Optional[str] = ..., announced: _Optional[bool] = ...) -> None: ...

class MeshTrustRequest(_message.Message):
    __slots__ = ("fingerprint",)
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    def __init__(self, fingerprint: _Optional[str] = ...) -> None: ...

class MeshTrustResponse(_message.Message):
    __slots__ = ("node_id", "was_refused", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WAS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: bytes
    was_refused: bool
    address: str
    def __init__(self, node_id: _Optional[bytes] = ..., was_refused: _Optional[bool] = ..., address: _Optional[str] = ...) -> None: ...

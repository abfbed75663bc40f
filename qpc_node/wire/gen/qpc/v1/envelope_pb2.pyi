from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("msg_id", "recipient", "expiry_ms", "hop_limit", "ciphertext")
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_MS_FIELD_NUMBER: _ClassVar[int]
    HOP_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    msg_id: bytes
    recipient: bytes
    expiry_ms: int
    hop_limit: int
    ciphertext: bytes
    def __init__(self, msg_id: _Optional[bytes] = ..., recipient: _Optional[bytes] = ..., expiry_ms: _Optional[int] = ..., hop_limit: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

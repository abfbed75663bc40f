import random

import pytest

from qpc_node.errors import LocalProtocolError, RemoteProtocolError, StatusCode
from qpc_node.wire import Envelope, pad, unpad
from qpc_node.wire.envelope import MAX_CIPHERTEXT, PAD_BUCKET


def _env(**kw: object) -> Envelope:
    base: dict[str, object] = dict(
        msg_id=bytes(range(16)),
        recipient=b"\x11" * 32,
        expiry_ms=1_700_000_000_000,
        hop_limit=8,
        ciphertext=b"x" * 256,
    )
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def test_roundtrip() -> None:
    env = _env()
    assert Envelope.decode(env.encode()) == env


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("msg_id", b"short"),
        ("recipient", b"\x00" * 31),
        ("expiry_ms", 0),
        ("hop_limit", 99),
        ("ciphertext", b""),
    ],
)
def test_invalid_fields_are_typed(field: str, value: object) -> None:
    env = _env(**{field: value})
    with pytest.raises(LocalProtocolError):
        env.encode()
    with pytest.raises(RemoteProtocolError):
        Envelope.from_proto(env.to_proto())


def test_oversize_ciphertext_is_payload_too_large() -> None:
    env = _env(ciphertext=b"\x01" * (MAX_CIPHERTEXT + 1))
    with pytest.raises(RemoteProtocolError) as ei:
        Envelope.from_proto(env.to_proto())
    assert ei.value.code == StatusCode.PAYLOAD_TOO_LARGE


def test_garbage_decodes_to_typed_error_only() -> None:
    rng = random.Random(7)
    good = _env().encode()
    rejected = 0
    for i in range(2000):
        if i % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
        else:
            b = bytearray(good)
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            data = bytes(b)
        try:
            env = Envelope.decode(data)
        except RemoteProtocolError:
            rejected += 1
        else:
            assert len(env.msg_id) == 16 and len(env.recipient) == 32
    # every random string (1000 of them) is refused; mutants may stay valid
    assert rejected >= 1000


def test_expired() -> None:
    env = _env(expiry_ms=1000)
    assert env.expired(1000) and not env.expired(999)


@pytest.mark.parametrize("n", [0, 1, 251, 252, 253, 1000, 4096])
def test_pad_buckets_and_roundtrip(n: int) -> None:
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    p = pad(data)
    assert len(p) % PAD_BUCKET == 0 and len(p) >= n + 4
    assert len(p) - (n + 4) < PAD_BUCKET
    assert unpad(p) == data


@pytest.mark.parametrize(
    "bad", [b"", b"\x00\x00", b"\x00\x00\x01\x00" + b"\x00" * 10, b"\x00\x00\x00\x01ab"]
)
def test_unpad_rejects_malformed(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        unpad(bad)

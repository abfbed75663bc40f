"""Inputs the fuzzers (tests/fuzz) found crashing something, kept as regression tests.

Each test is a bug the fuzzers found, fixed in its owning module; the test keeps
it fixed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from qpc_node import crypto
from qpc_node.errors import ConfigError
from qpc_node.ops.config import load_config
from tests.fuzz.runner import HarnessResult, Session, execute

# FetchRequest(after_seq=2**64-1, limit=2**32-1) and AckRequest(up_to_seq=2**64-1, identity=..)
FETCH_SEQ_MAX = b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\x10\xff\xff\xff\xff\x0f"
ACK_SEQ_MAX = b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
# AuthProveRequest(public_key=32 zero bytes, signature=64 zero bytes)
PROVE_ZERO = b"\n \x00" + bytes(31) + b"\x12@" + bytes(64)


async def _run(tmp_path: Path, harness: str, data: bytes) -> HarnessResult:
    async with Session([harness], tmp_path) as session:
        o = session.opened[harness]
        result = HarnessResult(harness)
        await execute(o.harness, o.target, data, result)
        return result


@pytest.mark.parametrize(
    ("harness", "data"),
    [("rpc.body.delivery.fetch", FETCH_SEQ_MAX), ("rpc.body.delivery.ack", ACK_SEQ_MAX)],
)
async def test_uint64_seq_beyond_sqlite_integer_is_not_internal(
    tmp_path: Path, harness: str, data: bytes
) -> None:
    # Was: OverflowError in store/mailbox.py (Python int too large for SQLite INTEGER)
    # -> the handler boundary answered INTERNAL. Fixed by clamping to 2**63-1.
    result = await _run(tmp_path, harness, data)
    assert result.crashes == []
    assert result.outcomes == {"OK": 1}


def test_small_order_public_key_signature_is_refused() -> None:
    # rust/src/mls.rs verify(): vk.verify(..) is not strict. The all-zero encoding is a
    # point of order 4; as public key AND as the signature's R (with S = 0) the equation
    # holds for about one message in four, so a forger just retries (verify_strict refuses
    # small-order keys and R).
    accepted = []
    for i in range(64):
        try:
            crypto.verify(bytes(32), b"message %d" % i, bytes(64))
        except crypto.InvalidSignature:
            continue
        accepted.append(i)
    assert accepted == []


async def test_auth_prove_with_zero_key_is_unauthenticated(tmp_path: Path) -> None:
    # Each attempt signs a fresh nonce: about one in four lets the zero key in.
    async with Session(["rpc.body.auth.prove"], tmp_path) as session:
        o = session.opened["rpc.body.auth.prove"]
        result = HarnessResult("prove")
        for _ in range(32):
            await execute(o.harness, o.target, PROVE_ZERO, result)
    assert result.outcomes == {"UNAUTHENTICATED": 32}


def test_config_file_not_utf8_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "qpc.toml"
    path.write_bytes(b'[log]\nlevel = "debug\xa0"\n')
    with pytest.raises(ConfigError):
        load_config(path, env={})


def test_config_section_not_a_table_with_env_override_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "qpc.toml"
    path.write_text("node = 1\n")
    with pytest.raises(ConfigError):
        load_config(path, env={"QPC_NODE_LISTEN": "127.0.0.1:1"})


def test_config_env_value_not_utf8_is_config_error() -> None:
    # os.environ carries undecodable bytes as lone surrogates (surrogateescape).
    with pytest.raises(ConfigError):
        load_config(None, env={"QPC_LOG": "debug\udc85"})


async def test_long_poll_that_times_out_leaves_no_waiter(tmp_path: Path) -> None:
    # FetchRequest(wait_ms=3) on an empty mailbox: nothing is parked afterwards.
    async with Session(["rpc.body.delivery.fetch"], tmp_path) as session:
        o = session.opened["rpc.body.delivery.fetch"]
        result = HarnessResult("fetch")
        await execute(o.harness, o.target, b"\x18\x03", result)
        assert result.outcomes == {"OK": 1}
        await trio.sleep(0.01)
        assert o.env.delivery.statistics().parked_fetches == 0

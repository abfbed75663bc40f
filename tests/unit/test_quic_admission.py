"""Sans-IO admission control (issue 11 items 2 and 5) on a virtual clock.

The pieces of :mod:`qpc_node.quic.admission` with ``now`` passed in, and the
backend's stateless packet helpers, without sockets. The endpoint wiring is in
``test_quic_admission_endpoint.py``.
"""

from __future__ import annotations

import os

import pytest
from aioquic._buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header

from qpc_node.errors import ConfigError
from qpc_node.quic import AdmissionLimits
from qpc_node.quic._aioquic import AioquicBackend
from qpc_node.quic.admission import (
    MIN_RESET_SIZE,
    RETRY_TOKEN_LIFETIME,
    Admission,
    AdmissionRefusals,
    InvalidToken,
    ReplyBudget,
    ResetTokens,
    RetryTokens,
    Verdict,
    stateless_reset,
)

ADDR = ("10.0.0.2", 50000)
ODCID = bytes(range(8))
SCID = b"retryscd"


def client_hello() -> bytes:
    config = QuicConfiguration(is_client=True, alpn_protocols=["qpc/1"], server_name="x")
    q = QuicConnection(configuration=config)
    q.connect(("10.0.0.1", 4201), now=0.0)
    return q.datagrams_to_send(0.0)[0][0]


# ---------------------------------------------------------------- Retry tokens
def test_retry_token_round_trip() -> None:
    tokens = RetryTokens()
    token = tokens.mint(ADDR, ODCID, SCID, now=100.0)
    assert tokens.verify(ADDR, SCID, token, now=100.0 + RETRY_TOKEN_LIFETIME) == ODCID


@pytest.mark.parametrize(
    ("addr", "dcid", "now"),
    [
        (("10.0.0.3", 50000), SCID, 101.0),  # another host
        (("10.0.0.2", 50001), SCID, 101.0),  # another port
        (ADDR, b"otherscd", 101.0),  # not sent to the Retry's source CID
        (ADDR, SCID, 100.0 + RETRY_TOKEN_LIFETIME + 0.01),  # expired
        (ADDR, SCID, 98.0),  # from the future
    ],
)
def test_retry_token_is_bound_to_address_cid_and_time(
    addr: tuple[str, int], dcid: bytes, now: float
) -> None:
    tokens = RetryTokens()
    token = tokens.mint(ADDR, ODCID, SCID, now=100.0)
    with pytest.raises(InvalidToken):
        tokens.verify(addr, dcid, token, now)


@pytest.mark.parametrize("token", [b"", b"x", os.urandom(28), os.urandom(60)])
def test_garbage_tokens_are_typed_errors(token: bytes) -> None:
    with pytest.raises(InvalidToken):
        RetryTokens().verify(ADDR, SCID, token, 0.0)


def test_retry_token_key_is_per_process() -> None:
    token = RetryTokens().mint(ADDR, ODCID, SCID, now=0.0)
    with pytest.raises(InvalidToken):
        RetryTokens().verify(ADDR, SCID, token, 0.0)


def test_ipv6_and_scoped_addresses_are_bound() -> None:
    tokens = RetryTokens()
    v6 = ("fe80::1%eth0", 4201, 0, 2)
    token = tokens.mint(v6, ODCID, SCID, now=0.0)
    assert tokens.verify(("fe80::1", 4201, 0, 2), SCID, token, 0.0) == ODCID
    with pytest.raises(InvalidToken):
        tokens.verify(("fe80::2", 4201, 0, 2), SCID, token, 0.0)


# ------------------------------------------------------------ stateless reset
def test_reset_tokens_survive_a_restart_and_differ_per_cid() -> None:
    secret = b"node private key pem"
    before, after = ResetTokens.from_secret(secret), ResetTokens.from_secret(secret)
    cid = os.urandom(8)
    assert before.token(cid) == after.token(cid)
    assert len(before.token(cid)) == 16
    assert before.token(cid) != before.token(os.urandom(8))
    assert ResetTokens.from_secret(b"another node").token(cid) != before.token(cid)
    with pytest.raises(ValueError):
        ResetTokens(b"short")


@pytest.mark.parametrize("trigger", [0, 1, 20, 21, 22, 30, 43, 44, 1200])
def test_reset_is_smaller_than_its_trigger(trigger: int) -> None:
    token = os.urandom(16)
    packet = stateless_reset(token, trigger)
    if trigger - 1 < MIN_RESET_SIZE:
        assert packet is None  # could be a reset itself: never answer (RFC 9000 10.3.3)
        return
    assert packet is not None
    assert MIN_RESET_SIZE <= len(packet) < trigger and len(packet) <= 43
    assert packet.endswith(token)
    assert packet[0] & 0xC0 == 0x40  # short header, fixed bit: looks like any 1-RTT packet


def test_two_strangers_resetting_each_other_stop() -> None:
    """Each reply is smaller than what triggered it, so a reset ping-pong dies out."""
    size, rounds = 1200, 0
    while (packet := stateless_reset(os.urandom(16), size)) is not None:
        size, rounds = len(packet), rounds + 1
        assert rounds < 30
    assert size <= MIN_RESET_SIZE + 1


def test_reply_budget_on_a_virtual_clock() -> None:
    budget = ReplyBudget(rate=10, burst=5)
    assert [budget.take(0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert budget.take(0.05) is False  # half a token
    assert budget.take(0.1) is True
    assert sum(budget.take(10.0) for _ in range(50)) == 5  # refills to the burst, no more
    assert budget.take(5.0) is False  # time going backwards earns nothing


# ------------------------------------------------------------------ decisions
def limits(**kw: float) -> AdmissionLimits:
    base: dict[str, float] = dict(
        max_connections=2,
        max_connections_per_ip=10,
        max_half_open=4,
        max_half_open_per_ip=3,
        retry_threshold=2,
    )
    base.update(kw)
    return AdmissionLimits(**base)  # type: ignore[arg-type]


def test_half_open_beyond_the_threshold_must_pass_a_retry() -> None:
    gate = Admission(limits(), RetryTokens())
    for i in range(2):
        d = gate.decide(ADDR, f"10.0.1.{i}", ODCID, b"", now=0.0)
        assert d.verdict is Verdict.ADMIT and d.original_dcid == ODCID
        assert d.retry_source_cid is None
        gate.opened(f"10.0.1.{i}")
    # Third handshake in flight: no state without a proven address.
    assert gate.decide(ADDR, "10.0.0.2", ODCID, b"", now=0.0).verdict is Verdict.RETRY
    token = gate.tokens.mint(ADDR, ODCID, SCID, now=0.0)
    d = gate.decide(ADDR, "10.0.0.2", SCID, token, now=0.5)
    assert (d.verdict, d.original_dcid, d.retry_source_cid) == (Verdict.ADMIT, ODCID, SCID)
    # A token for someone else's address is refused, and said so (INVALID_TOKEN).
    d = gate.decide(("10.0.0.9", 1), "10.0.0.9", SCID, token, now=0.5)
    assert d.verdict is Verdict.INVALID_TOKEN


def test_half_open_cap_and_per_ip_cap() -> None:
    gate = Admission(limits(retry_threshold=0), RetryTokens())
    token = gate.tokens.mint(ADDR, ODCID, SCID, now=0.0)
    for _ in range(3):
        assert gate.decide(ADDR, "10.0.0.2", SCID, token, 0.0).verdict is Verdict.ADMIT
        gate.opened("10.0.0.2")
    d = gate.decide(ADDR, "10.0.0.2", SCID, token, 0.0)
    assert (d.verdict, d.reason) == (Verdict.REFUSE, "half_open_per_ip")
    other = ("10.0.0.3", 1)
    t3 = gate.tokens.mint(other, ODCID, SCID, now=0.0)
    assert gate.decide(other, "10.0.0.3", SCID, t3, 0.0).verdict is Verdict.ADMIT
    gate.opened("10.0.0.3")
    d = gate.decide(other, "10.0.0.3", SCID, t3, 0.0)
    assert (d.verdict, d.reason) == (Verdict.REFUSE, "half_open_full")
    gate.finished("10.0.0.3", established=False)  # its deadline passed
    assert gate.decide(other, "10.0.0.3", SCID, t3, 0.0).verdict is Verdict.ADMIT
    assert gate.refusals() == AdmissionRefusals(half_open_per_ip=1, half_open_full=1)


def test_established_users_keep_their_slots() -> None:
    """Promotion moves a slot from the half-open pool; a full node refuses new ones
    at the door and at confirmation, never by dropping someone established."""
    gate = Admission(limits(), RetryTokens())
    for ip in ("10.0.1.1", "10.0.1.2"):
        gate.opened(ip)
        assert gate.promote(ip)
    assert (gate.half_open, gate.established) == (0, 2)
    d = gate.decide(ADDR, "10.0.0.2", ODCID, b"", 0.0)
    assert (d.verdict, d.reason) == (Verdict.REFUSE, "established_full")
    gate.opened("10.0.0.5")  # admitted earlier, confirms now: no room
    assert not gate.promote("10.0.0.5")
    assert (gate.half_open, gate.established) == (1, 2)
    gate.finished("10.0.0.5", established=False)
    gate.finished("10.0.1.1", established=True)
    assert (gate.half_open, gate.established) == (0, 1)
    assert gate.decide(ADDR, "10.0.0.2", ODCID, b"", 0.0).verdict is Verdict.ADMIT


def test_per_ip_counts_both_phases() -> None:
    gate = Admission(limits(max_connections=10, max_connections_per_ip=2), RetryTokens())
    gate.opened("10.0.0.2")
    gate.promote("10.0.0.2")
    gate.opened("10.0.0.2")
    d = gate.decide(ADDR, "10.0.0.2", ODCID, b"", 0.0)
    assert (d.verdict, d.reason) == (Verdict.REFUSE, "per_ip")


@pytest.mark.parametrize(
    "kw",
    [
        {"max_half_open": 0},
        {"max_half_open_per_ip": 0},
        {"retry_threshold": 5},  # above max_half_open
        {"retry_threshold": -1},
        {"half_open_timeout": 0.0},
        {"retry_rate": 0.0},
        {"reset_rate": float("inf")},
    ],
)
def test_bad_limits_are_config_errors(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        limits(**kw)


# ------------------------------------------------- backend's stateless packets
def garbage_initial() -> bytes:
    head = b"\xc3\x00\x00\x00\x01\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + b"\x00"
    rest = 1200 - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


def test_initial_decrypts_tells_a_client_hello_from_random_bytes() -> None:
    backend = AioquicBackend()
    hello = client_hello()
    assert backend.initial_decrypts(hello)
    assert not backend.initial_decrypts(garbage_initial())
    assert not backend.initial_decrypts(hello[:100])  # truncated
    end = pull_quic_header(Buffer(data=hello), host_cid_length=8).packet_length
    flipped = bytearray(hello)
    flipped[end - 1] ^= 1  # the AEAD tag (aioquic pads *after* the packet)
    assert not backend.initial_decrypts(bytes(flipped))
    assert not backend.initial_decrypts(b"")


def test_retry_and_invalid_token_close_are_what_a_client_reads() -> None:
    backend = AioquicBackend()
    hello = client_hello()
    header = backend.parse_header(hello)
    assert header is not None and header.version == 1 and header.token == b""
    retry = backend.retry_packet(header, SCID, b"tok")
    parsed = pull_quic_header(Buffer(data=retry), host_cid_length=8)
    assert parsed.packet_type == QuicPacketType.RETRY
    assert (parsed.destination_cid, parsed.source_cid) == (header.source_cid, SCID)
    assert parsed.token == b"tok"
    assert len(retry) < len(hello)  # no amplification

    close = backend.invalid_token_close(header)
    buf = Buffer(data=close)
    parsed = pull_quic_header(buf, host_cid_length=8)
    assert parsed.packet_type == QuicPacketType.INITIAL
    crypto = CryptoPair()
    crypto.setup_initial(header.destination_cid, is_client=True, version=1)
    _, payload, _ = crypto.decrypt_packet(close[: parsed.packet_length], buf.tell(), 0)
    frame = Buffer(data=payload)
    assert frame.pull_uint_var() == 0x1C  # CONNECTION_CLOSE (transport)
    assert frame.pull_uint_var() == QuicErrorCode.INVALID_TOKEN
    assert len(close) <= len(hello)


# ------------------------------------------- aioquic hooks (fail on upgrade)
def test_aioquic_reset_token_hooks_exist() -> None:
    """What _aioquic.py reaches into for stateless reset (see its module docstring)."""
    import inspect

    from aioquic.quic import connection as qc

    assert list(inspect.signature(QuicConnection._replenish_connection_ids).parameters) == ["self"]
    assert list(inspect.signature(QuicConnection._close_end).parameters) == ["self"]
    assert "stateless_reset_token" in qc.QuicConnectionId.__dataclass_fields__
    assert "os.urandom(16)" in inspect.getsource(QuicConnection._replenish_connection_ids)
    q = QuicConnection(configuration=QuicConfiguration(is_client=True))
    for attr in ("_host_cids", "_peer_cid", "_close_event", "_state"):
        assert hasattr(q, attr), attr
    assert qc.QuicConnectionState.TERMINATED in qc.END_STATES  # no second _close_end


def test_tokens_we_hand_out_are_the_derived_ones() -> None:
    """In memory: the transport parameter and every NEW_CONNECTION_ID carry
    HMAC(key, cid), so a restarted process can reset any CID the client uses."""
    from qpc_node.quic import ALPN_CLIENT, ClientTLS, QuicSettings, ServerTLS
    from qpc_node.quic.testing import make_test_pki

    pki = make_test_pki()
    backend, settings = AioquicBackend(), QuicSettings()
    keys = ResetTokens.from_secret(pki.server.private_key_pem)
    client = backend.create_client(ClientTLS(ALPN_CLIENT, pin=pki.server.fingerprint), settings)
    client.connect(("10.0.0.1", 4201), 0.0)
    pending = client.datagrams_to_send(0.0)
    header = backend.parse_header(pending[0][0])
    assert header is not None
    server = backend.create_server(
        ServerTLS(pki.server), settings, header.destination_cid, reset_tokens=keys
    )
    now = 0.0
    for _ in range(20):
        now += 0.01
        for data, _ in pending:
            server.receive_datagram(data, ("10.0.0.2", 5000), now)
        replies = server.datagrams_to_send(now)
        for data, _ in replies:
            client.receive_datagram(data, ("10.0.0.1", 4201), now)
        pending = client.datagrams_to_send(now)
        if not pending and not replies:
            break
    q = client._q  # type: ignore[attr-defined]
    assert q._handshake_confirmed
    issued = [q._peer_cid, *q._peer_cid_available]
    assert len(issued) > 1  # the first CID plus NEW_CONNECTION_IDs
    for cid in issued:
        assert cid.stateless_reset_token == keys.token(cid.cid)
    assert client.peer_reset_token == keys.token(q._peer_cid.cid)

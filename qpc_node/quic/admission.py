"""Sans-IO admission control for the server side of the endpoint.

No sockets, no clock: the endpoint passes ``now`` (monotonic seconds) and the
packet fields; these classes decide and count. Three pieces:

* :class:`RetryTokens` -- stateless address validation (RFC 9000 8.1.2). A
  Retry token is an AEAD box under a key random per process, bound to the
  client's address and the Retry's source CID (associated data) and carrying
  the original DCID and the time it was minted. A spoofed source never sees
  the Retry, so it can never present a token: under load only peers that can
  receive at their address get a connection (and its state) at all.
* :class:`ResetTokens` -- stateless reset tokens (RFC 9000 10.3) derived from a
  static key and the connection ID, so a restarted process sends the very token
  the old one handed out and clients drop a dead connection at once instead of
  waiting out their idle timeout.
* :class:`Admission` -- counts server connections by phase (half-open until
  the handshake is confirmed, then established) and decides what a new Initial
  gets: a connection, a Retry, or nothing. Half-open and established slots are
  separate, so a handshake flood can never take the slots of users who are in.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import math
import os
import struct
from collections import Counter
from typing import Literal

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qpc_node.errors import RemoteProtocolError
from qpc_node.quic.address import Address
from qpc_node.quic.settings import AdmissionLimits

#: Clients answer a Retry at once (one RTT); a token older than this is refused.
RETRY_TOKEN_LIFETIME = 10.0
RESET_TOKEN_SIZE = 16
#: RFC 9000 10.3: 5 unpredictable bytes (first byte 0b01xxxxxx) plus the token.
MIN_RESET_SIZE = 21
#: Resets to short packets mirror their size minus one (10.3.3); longer ones get this.
RESET_SIZE = 43
_NONCE = 12
_MAX_CID = 20


class InvalidToken(RemoteProtocolError):
    """A Retry token that is not ours, is for another address or CID, or has expired."""


def encode_address(addr: Address) -> bytes:
    """IP (4 or 16 bytes, scope dropped) and port: what a token is bound to."""
    ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
    return ip.packed + struct.pack("!H", addr[1])


class RetryTokens:
    """Mint and check Retry tokens; ``key`` random per process unless given (tests)."""

    def __init__(self, key: bytes | None = None, *, lifetime: float = RETRY_TOKEN_LIFETIME):
        self._aead = AESGCM(key if key is not None else AESGCM.generate_key(bit_length=128))
        self.lifetime = lifetime

    def mint(self, addr: Address, original_dcid: bytes, retry_scid: bytes, now: float) -> bytes:
        nonce = os.urandom(_NONCE)
        plain = bytes([len(original_dcid)]) + original_dcid + struct.pack("!q", round(now * 1000))
        return nonce + self._aead.encrypt(nonce, plain, encode_address(addr) + retry_scid)

    def verify(self, addr: Address, dcid: bytes, token: bytes, now: float) -> bytes:
        """The original DCID the token was minted for; raises :class:`InvalidToken`.

        ``dcid`` is the DCID of the Initial carrying the token: the client must
        send to the Retry's source CID (RFC 9000 17.2.5.2), so it is bound too.
        """
        if len(token) < _NONCE + 16:
            raise InvalidToken("retry token too short")
        try:
            plain = self._aead.decrypt(token[:_NONCE], token[_NONCE:], encode_address(addr) + dcid)
        except InvalidTag:
            raise InvalidToken("retry token not ours, or for another address") from None
        n = plain[0]
        if n > _MAX_CID or len(plain) != 1 + n + 8:
            raise InvalidToken("retry token malformed")
        (issued_ms,) = struct.unpack("!q", plain[1 + n :])
        age = now - issued_ms / 1000
        if not -1.0 <= age <= self.lifetime:  # -1: rounding to ms, never the future
            raise InvalidToken("retry token expired")
        return plain[1 : 1 + n]


class ResetTokens:
    """Stateless reset token = HMAC-SHA256(static key, CID)[:16].

    The key must outlive the process (derive it from a persistent secret with
    :meth:`from_secret`): the point is that the *next* process, which knows
    nothing of the connection, can still prove to the client it is gone.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("stateless reset key must be at least 16 bytes")
        self._key = key

    @classmethod
    def from_secret(cls, secret: bytes) -> ResetTokens:
        """Domain-separated from whatever else ``secret`` is used for."""
        return cls(hmac.digest(secret, b"qpc quic stateless reset key v1", hashlib.sha256))

    @classmethod
    def random(cls) -> ResetTokens:
        """For endpoints without a persistent secret (client-only agents)."""
        return cls(os.urandom(32))

    def token(self, cid: bytes) -> bytes:
        return hmac.digest(self._key, cid, hashlib.sha256)[:RESET_TOKEN_SIZE]


def stateless_reset(token: bytes, trigger_size: int) -> bytes | None:
    """A stateless reset for a packet of ``trigger_size`` bytes, or None.

    Always strictly smaller than the trigger (RFC 9000 10.3.3): two endpoints
    that each take the other's reset for an unknown packet cannot loop, and it
    is never an amplifier. Too small a trigger gets nothing: a reset cannot be
    shorter than 21 bytes.
    """
    size = min(trigger_size - 1, RESET_SIZE)
    if size < MIN_RESET_SIZE:
        return None
    head = bytearray(os.urandom(size - RESET_TOKEN_SIZE))
    head[0] = 0x40 | (head[0] & 0x3F)  # short header form, fixed bit set
    return bytes(head) + token


class ReplyBudget:
    """Token bucket for replies to packets of no connection (Retry, reset, close).

    Those go to an address nobody validated; the budget bounds what a spoofer
    can make us send to a victim (each reply is also smaller than its trigger).
    """

    def __init__(self, rate: float, burst: float) -> None:
        if not (rate > 0 and math.isfinite(rate) and burst >= 1):
            raise ValueError("reply budget: rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp: float | None = None

    def take(self, now: float) -> bool:
        if self._stamp is not None and now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        if self._stamp is None or now > self._stamp:
            self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class Verdict(enum.Enum):
    ADMIT = "admit"
    RETRY = "retry"  # send a Retry, keep no state
    INVALID_TOKEN = "invalid_token"  # close with INVALID_TOKEN (RFC 9000 8.1.3), no state
    REFUSE = "refuse"  # drop silently


RefusalReason = Literal[
    "invalid_token",
    "established_full",
    "per_ip",
    "half_open_per_ip",
    "half_open_full",
    "retry_rate",
]


class AdmissionRefusals(msgspec.Struct, frozen=True):
    """Refused new connections by the limit that refused them (a typed snapshot: a renamed
    reason fails mypy in the metrics layer instead of exporting a silent zero)."""

    invalid_token: int = 0
    established_full: int = 0
    per_ip: int = 0
    half_open_per_ip: int = 0
    half_open_full: int = 0
    retry_rate: int = 0


class Decision(msgspec.Struct, frozen=True):
    verdict: Verdict
    reason: str = ""  # for REFUSE / INVALID_TOKEN: which limit
    original_dcid: bytes = b""  # for ADMIT: what the transport parameters must echo
    retry_source_cid: bytes | None = None  # for ADMIT after a Retry


class Admission:
    """Counts server connections by phase and decides what a new Initial gets.

    The caller reports every transition: :meth:`opened` when it creates a
    connection for an ADMIT, :meth:`promote` when that handshake is confirmed,
    :meth:`finished` when it is gone. ``decide`` is only asked about Initials
    that decrypted (the endpoint checks that first, statelessly).
    """

    def __init__(self, limits: AdmissionLimits, tokens: RetryTokens) -> None:
        self.limits = limits
        self.tokens = tokens
        self.half_open = 0
        self.established = 0
        self._per_ip: Counter[str] = Counter()  # both phases
        self._half_open_per_ip: Counter[str] = Counter()
        self._refusals: Counter[RefusalReason] = Counter()

    def decide(self, addr: Address, ip: str, dcid: bytes, token: bytes, now: float) -> Decision:
        lim = self.limits
        validated = bool(token)
        original_dcid = dcid
        if validated:
            try:
                original_dcid = self.tokens.verify(addr, dcid, token, now)
            except InvalidToken:
                return self._refuse("invalid_token", Verdict.INVALID_TOKEN)
        if self.established >= lim.max_connections:
            return self._refuse("established_full")
        if self._per_ip[ip] >= lim.max_connections_per_ip:
            return self._refuse("per_ip")
        if self._half_open_per_ip[ip] >= lim.max_half_open_per_ip:
            return self._refuse("half_open_per_ip")
        if not validated and self.half_open >= lim.retry_threshold:
            return Decision(Verdict.RETRY)
        if self.half_open >= lim.max_half_open:
            return self._refuse("half_open_full")
        return Decision(
            Verdict.ADMIT,
            original_dcid=original_dcid,
            retry_source_cid=dcid if validated else None,
        )

    def _refuse(self, reason: RefusalReason, verdict: Verdict = Verdict.REFUSE) -> Decision:
        self.refuse(reason)
        return Decision(verdict, reason=reason)

    def refuse(self, reason: RefusalReason) -> None:
        """Count a refusal (also for the ones the endpoint decides, e.g. the Retry rate)."""
        self._refusals[reason] += 1

    def refusals(self) -> AdmissionRefusals:
        c = self._refusals
        return AdmissionRefusals(
            invalid_token=c["invalid_token"],
            established_full=c["established_full"],
            per_ip=c["per_ip"],
            half_open_per_ip=c["half_open_per_ip"],
            half_open_full=c["half_open_full"],
            retry_rate=c["retry_rate"],
        )

    def opened(self, ip: str) -> None:
        self.half_open += 1
        self._per_ip[ip] += 1
        self._half_open_per_ip[ip] += 1

    def promote(self, ip: str) -> bool:
        """Half-open -> established; False (and no change) when established is full."""
        if self.established >= self.limits.max_connections:
            self.refuse("established_full")
            return False
        self.half_open -= 1
        self.established += 1
        _dec(self._half_open_per_ip, ip)
        return True

    def finished(self, ip: str, *, established: bool) -> None:
        if established:
            self.established -= 1
        else:
            self.half_open -= 1
            _dec(self._half_open_per_ip, ip)
        _dec(self._per_ip, ip)


def _dec(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]

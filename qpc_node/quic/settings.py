"""Tunables of the QUIC layer, validated once at construction."""

from __future__ import annotations

import math

import msgspec

from qpc_node.errors import ConfigError


class QuicSettings(msgspec.Struct, frozen=True):
    """Per-connection knobs; the defaults suit a router with a few hundred peers.

    ``dead_peer_timeout`` is the promise: a peer that stops answering is noticed
    within it. We ping after ``keepalive_interval`` of silence and give the core
    an idle timeout of ``dead_peer_timeout - keepalive_interval``, because the
    core restarts its idle timer when it sends that first ping (RFC 9000 10.1).

    Receive windows bound memory per stream and per connection: the window is
    only extended as the reader consumes, so a slow reader throttles the peer.
    """

    dead_peer_timeout: float = 30.0
    keepalive_interval: float | None = None  # default: dead_peer_timeout / 4
    handshake_timeout: float = 10.0
    stream_receive_window: int = 256 * 1024
    connection_receive_window: int = 1024 * 1024
    max_streams_bidi: int = 128
    send_high_water: int = 256 * 1024
    max_datagram_size: int = 1200
    timer_slack: float = 0.001

    def __post_init__(self) -> None:
        if self.dead_peer_timeout <= 0:
            raise ConfigError("dead_peer_timeout must be > 0")
        if not 0 < self.keepalive_seconds < self.dead_peer_timeout:
            raise ConfigError("keepalive_interval must be within (0, dead_peer_timeout)")
        if self.stream_receive_window < 1024 or self.connection_receive_window < 1024:
            raise ConfigError("receive windows must be at least 1 KiB")
        if not 1 <= self.max_streams_bidi <= 1 << 16:
            raise ConfigError("max_streams_bidi must be within [1, 65536]")
        if self.send_high_water < 1:
            raise ConfigError("send_high_water must be >= 1")
        if self.max_datagram_size < 1200:
            raise ConfigError("max_datagram_size must be >= 1200 (RFC 9000 14)")

    @property
    def keepalive_seconds(self) -> float:
        if self.keepalive_interval is not None:
            return self.keepalive_interval
        return self.dead_peer_timeout / 4

    @property
    def idle_timeout(self) -> float:
        return self.dead_peer_timeout - self.keepalive_seconds


class AdmissionLimits(msgspec.Struct, frozen=True):
    """Caps on server-side connections; new Initials beyond them are dropped.

    A connection is *half-open* from its first Initial until the handshake is
    confirmed, then *established*. The two phases have separate caps so that a
    handshake flood (spoofed or real ClientHellos) can never take the slots of
    users who are already in, and half-open ones get a short life of their own
    (``half_open_timeout``) instead of the idle timeout. Once
    ``retry_threshold`` handshakes are in flight, a new client must first prove
    its address with a stateless Retry (0: always). Replies to packets of no
    connection (Retry, stateless reset, INVALID_TOKEN close) are rate-limited.
    """

    max_connections: int = 1024  # established
    max_connections_per_ip: int = 32  # both phases
    max_half_open: int = 256
    max_half_open_per_ip: int = 16
    half_open_timeout: float = 5.0
    retry_threshold: int = 32
    retry_rate: float = 2000.0  # Retry packets per second (burst: one second's worth)
    reset_rate: float = 200.0  # stateless resets and closes per second (same burst rule)

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_ip < 1:
            raise ConfigError("admission limits must be >= 1")
        if self.max_half_open < 1 or self.max_half_open_per_ip < 1:
            raise ConfigError("half-open limits must be >= 1")
        if not 0 <= self.retry_threshold <= self.max_half_open:
            raise ConfigError("retry_threshold must be within [0, max_half_open]")
        if not 0 < self.half_open_timeout <= 120:
            raise ConfigError("half_open_timeout must be within (0, 120] seconds")
        if not (1 <= self.retry_rate < math.inf and 1 <= self.reset_rate < math.inf):
            raise ConfigError("retry_rate and reset_rate must be >= 1 per second")

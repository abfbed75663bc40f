"""Tunables of the QUIC layer, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from qpc_node.errors import ConfigError


@dataclass(frozen=True, slots=True)
class QuicSettings:
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


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """Caps on server-side connections; new Initials beyond them are dropped."""

    max_connections: int = 1024
    max_connections_per_ip: int = 32

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_ip < 1:
            raise ConfigError("admission limits must be >= 1")

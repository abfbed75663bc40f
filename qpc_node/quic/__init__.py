"""Trio adapter for a sans-IO QUIC core (aioquic): endpoint, connections, streams, TLS policy.

Layering (imports point inward): ``endpoint`` -> ``connection`` -> ``stream``;
all of them talk to the QUIC implementation only through ``backend`` (the
aioquic version is ``_aioquic``) and to the network only through
``transport.DatagramSocket`` (real UDP, or ``testing.FakeNetwork``).
"""

# ruff: noqa: E402  (the imports below must run after the deferring import above them)

from qpc_node.deferred_imports import import_aioquic_tls

# Before any module of this package imports aioquic (qpc_node/deferred_imports.py says why).
import_aioquic_tls()

from qpc_node.quic.address import Address
from qpc_node.quic.connection import Connection, ConnectionStatistics, StreamHandler
from qpc_node.quic.endpoint import DEFAULT_PORT, Endpoint, EndpointStatistics, open_endpoint
from qpc_node.quic.errors import ConnectionClosed, HandshakeError, StreamReset
from qpc_node.quic.settings import AdmissionLimits, QuicSettings
from qpc_node.quic.stream import QuicStream
from qpc_node.quic.tls import (
    ALPN_CLIENT,
    ALPN_FEDERATION,
    ClientTLS,
    NodeCredentials,
    PeerIdentity,
    ServerTLS,
    load_or_create_node_credentials,
)

__all__ = [
    "ALPN_CLIENT",
    "ALPN_FEDERATION",
    "DEFAULT_PORT",
    "Address",
    "AdmissionLimits",
    "ClientTLS",
    "Connection",
    "ConnectionClosed",
    "ConnectionStatistics",
    "Endpoint",
    "EndpointStatistics",
    "HandshakeError",
    "NodeCredentials",
    "PeerIdentity",
    "QuicSettings",
    "QuicStream",
    "ServerTLS",
    "StreamHandler",
    "StreamReset",
    "load_or_create_node_credentials",
    "open_endpoint",
]

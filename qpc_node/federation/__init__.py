"""Federation: node-to-node links over ALPN ``qpc-fed/1`` with mutual TLS.

- :mod:`.trust`: who may federate (mesh mode: trust on first use of node ids,
  pinned in the store; managed mode: a community CA), plugged into the QUIC
  layer's TLS hooks.
- :mod:`.routes`: the routing decision (``resolve(recipient) -> Local | NextHop |
  NoRoute``) and :class:`~.routes.StaticRoutes`.
- :mod:`.core`: :class:`~.core.Federation` -- one link per neighbour, health
  pings and link events, the federation RPCs (RelayEnqueue, ProxyKeyPackageFetch,
  Announce, Ping), per-neighbour limits and the SQLite custody queue
  (``qpc_node.store.federation``) drained per next hop.
"""

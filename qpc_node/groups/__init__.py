"""Group protocol on a partition-prone mesh (issue 14; docs/groups.md).

:mod:`.core` is the sans-IO Stage A core (intents, committer list and failover,
commit pulls, past-epoch retention by time); the client (qpc_node/client) and the
simulation harness (qpc_sim/groups.py) drive it over the real MLS core.
"""

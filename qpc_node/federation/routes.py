"""The routing decision the federation layer asks for, and static routes.

``resolve(recipient) -> Local() | NextHop(node_id) | NoRoute()`` is all the
relay needs to know: store here, hand to that neighbour, or refuse with a
retriable "no route yet". The mesh routing core (distance vector + home
bindings) provides it once wired; :class:`StaticRoutes` is the operator's
fixed table -- for meshes too small or too filtered for route announcements,
for the demo, and for the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from qpc_node.errors import ConfigError


class Local(msgspec.Struct, frozen=True):
    """The recipient is homed on this node: its mailbox is here."""


class NextHop(msgspec.Struct, frozen=True):
    """Hand the envelope to this neighbour (a node id with a federation link)."""

    node_id: bytes
    hops: int = 0
    """Hops from here to the recipient's home node (1: the neighbour is it); 0 when
    the resolver does not know (static routes): the entry node's hop_limit check
    only applies to a known distance."""


class NoRoute(msgspec.Struct, frozen=True):
    """No home or no path known (yet): a retriable refusal, never a silent drop."""


Route = Local | NextHop | NoRoute
Resolver = Callable[[bytes], Route]


class StaticRoutes:
    """Configured routes: user -> home node, and home node -> next hop.

    ``homes`` maps a user fingerprint to the node id it is homed on; users
    homed on ``local_node`` resolve to :class:`Local`. ``via`` maps a
    destination node id to the neighbour to hand its mail to; a destination
    missing from it is assumed to be a direct neighbour (its own next hop).
    Lookups are O(1); the table is replaced whole by :meth:`update` (the
    caller keeps one object and swaps its contents, so the federation layer
    keeps resolving through the same callable).
    """

    def __init__(
        self,
        local_node: bytes,
        homes: Mapping[bytes, bytes] | None = None,
        via: Mapping[bytes, bytes] | None = None,
    ) -> None:
        if len(local_node) != 32:
            raise ConfigError("local_node must be a 32-byte node id")
        self.local_node = local_node
        self._homes: dict[bytes, bytes] = {}
        self._via: dict[bytes, bytes] = {}
        self.update(homes or {}, via or {})

    def update(self, homes: Mapping[bytes, bytes], via: Mapping[bytes, bytes]) -> None:
        for key, value in [*homes.items(), *via.items()]:
            if len(key) != 32 or len(value) != 32:
                raise ConfigError("static routes map 32-byte ids to 32-byte node ids")
        if self.local_node in via:
            raise ConfigError("a static route cannot send this node's own mail elsewhere")
        self._homes = dict(homes)
        self._via = dict(via)

    def home(self, user: bytes, node: bytes) -> None:
        """Add or move one user's home."""
        self._homes[user] = node

    def home_of(self, user: bytes) -> bytes | None:
        """The node ``user`` is homed on, if configured (receipts are checked against it)."""
        return self._homes.get(user)

    def __call__(self, recipient: bytes) -> Route:
        return self.resolve(recipient)

    def resolve(self, recipient: bytes) -> Route:
        home = self._homes.get(recipient)
        if home is None:
            return NoRoute()
        if home == self.local_node:
            return Local()
        return NextHop(self._via.get(home, home))

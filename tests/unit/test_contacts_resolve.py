"""Contact names and short codes -> fingerprints (the pure resolver behind every
REPL command that names a user)."""

from __future__ import annotations

import pytest

from qpc_node.client.contacts import (
    AmbiguousPeer,
    Known,
    UnknownPeer,
    looks_like_peer,
    resolve,
    valid_name,
)
from qpc_node.client.fingerprint import short_code

BOB = "b0b0" + "1" * 60
BOBBY = "b0b0" + "2" * 60
CAROL = "ca01" + "3" * 60
CAFE = "cafe" + "4" * 60
KNOWN = [Known(BOB, "bob"), Known(BOBBY), Known(CAROL, "carol"), Known(CAFE, "cafe")]


@pytest.mark.parametrize(
    ("token", "want"),
    [
        ("bob", BOB),
        ("carol", CAROL),
        (BOB.upper(), BOB),  # a full fingerprint is taken as is
        ("ab" * 32, "ab" * 32),  # even one we do not know (a first DM)
        (short_code(CAROL), CAROL),  # the short form the REPL prints
        ("ca01", CAROL),
        ("b0b02", BOBBY),
        ("B0B0-1111", BOB),
    ],
)
def test_resolves(token: str, want: str) -> None:
    assert resolve(token, KNOWN) == want


def test_ambiguous_prefix_lists_every_match() -> None:
    with pytest.raises(AmbiguousPeer) as ei:
        resolve("b0b0", KNOWN)
    msg = str(ei.value)
    assert "2 users" in msg and "bob (b0b0-1111)" in msg and "b0b0-2222" in msg


def test_a_hex_looking_name_cannot_shadow_another_users_code() -> None:
    """'cafe' is a contact's name and a prefix of nobody else: fine. A name that is also
    another user's prefix is ambiguous, not silently the named one."""
    assert resolve("cafe", KNOWN) == CAFE
    shadow = [*KNOWN, Known("ca01" + "5" * 60, "b0b0")]
    with pytest.raises(AmbiguousPeer):
        resolve("b0b0", shadow)


@pytest.mark.parametrize("token", ["dave", "abc", "ffff", "b0b", "not*a*name", ""])
def test_unknown_is_a_clear_error(token: str) -> None:
    with pytest.raises(UnknownPeer, match="no contact or known user"):
        resolve(token, KNOWN)


def test_the_same_user_seen_twice_is_one_match() -> None:
    assert resolve("b0b01", [Known(BOB), Known(BOB, "bob")]) == BOB


def test_names_and_tokens() -> None:
    assert valid_name("bob") and valid_name("a.b-c_1")
    assert not valid_name("") and not valid_name("x" * 33) and not valid_name("b b")
    assert not valid_name("ab" * 32)  # a fingerprint is not a name
    assert looks_like_peer("ab" * 32) and looks_like_peer("abcd-ef01")
    assert not looks_like_peer("a/b")


def test_random_tokens_give_a_fingerprint_or_a_typed_error() -> None:
    import contextlib
    import random

    from qpc_node.client.session import parse_address
    from qpc_node.errors import LocalProtocolError

    rng = random.Random(12)
    alphabet = "abcdef0123456789-:_.[]%/ xyzé\x00"
    for _ in range(3000):
        token = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        for fn in (lambda t: resolve(t, KNOWN), parse_address):
            with contextlib.suppress(LocalProtocolError):
                fn(token)


def test_dm_report_wording() -> None:
    from qpc_node.client.agent import DmReport
    from qpc_node.client.outbox import Sent
    from qpc_node.repl.runner import describe_route

    assert describe_route(DmReport("b", Sent.DELIVERED, 0, "")) == "(stored on this node)"
    assert describe_route(DmReport("b", Sent.DELIVERED, 3, "")) == "(relayed via 3 hops)"
    old_node = DmReport("b", Sent.DELIVERED, 0, "", stored_here=False)
    assert describe_route(old_node) == "(accepted for relay)"
    queued = DmReport("b", Sent.RETRY, 0, "no route yet")
    assert describe_route(queued) == "(queued: no route yet; retrying)"
    assert describe_route(DmReport("b", Sent.DROPPED, 0, "")) == "(not delivered)"
    held = DmReport("b", Sent.DELIVERED, 0, "", stored_here=False, held=True)
    assert describe_route(held) == "(held on this node until a route appears)"

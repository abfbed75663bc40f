"""Naming people: contact names and short codes resolved to fingerprints (pure).

A command that takes a user fingerprint also takes a contact's name or a unique
short code (a hex prefix such as the ``abcd-ef01`` the REPL prints) of a user we
know: a contact, a conversation peer, a group member. Resolution never guesses:
several matches are an error that lists them, and a prefix too short to mean
anything is refused. A full 64-digit fingerprint is taken as it is (we may not
know the user yet: that is how a first DM starts).
"""

from __future__ import annotations

import string
from collections.abc import Iterable

import msgspec

from qpc_node.client.fingerprint import FPR_HEX_LEN, normalize, short_code
from qpc_node.errors import LocalProtocolError

MIN_PREFIX = 4
"""Hex digits a short code needs: fewer would match by accident."""
MAX_LISTED = 8
NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_.-")
MAX_NAME = 32


class UnknownPeer(LocalProtocolError):
    """No contact, and no known user, answers to this name or code."""


class AmbiguousPeer(LocalProtocolError):
    """Several known users answer to this code: the message lists them."""


class Known(msgspec.Struct, frozen=True):
    """A user we know: a fingerprint (64 lower-case hex digits) and its contact name, if any."""

    fingerprint: str
    name: str | None = None


def valid_name(name: str) -> bool:
    """A contact name: 1-32 of letters, digits, ``_ . -``; not a 64-digit fingerprint."""
    if not 0 < len(name) <= MAX_NAME or not set(name) <= NAME_CHARS:
        return False
    return not (len(name) == FPR_HEX_LEN and set(name.lower()) <= set(string.hexdigits))


def looks_like_peer(token: str) -> bool:
    """Could ``token`` name a user (a fingerprint, a name or a short code)? For parsing."""
    try:
        normalize(token)
        return True
    except LocalProtocolError:
        return valid_name(token)


def _hex_prefix(token: str) -> str | None:
    s = token.strip().lower().replace("-", "").replace(":", "")
    if len(s) >= MIN_PREFIX and set(s) <= set(string.hexdigits.lower()):
        return s
    return None


def _label(k: Known) -> str:
    return f"{k.name} ({short_code(k.fingerprint)})" if k.name else short_code(k.fingerprint)


def resolve(token: str, known: Iterable[Known]) -> str:
    """The fingerprint ``token`` means: a fingerprint, an exact contact name, or a unique
    hex prefix of a known user's fingerprint (a name spelled like hex counts both ways:
    no name can shadow another user's code)."""
    try:
        return normalize(token)
    except LocalProtocolError:
        pass
    people: dict[str, Known] = {}
    for k in known:
        if k.name or k.fingerprint not in people:
            people[k.fingerprint] = k
    matches = {k.fingerprint for k in people.values() if k.name is not None and k.name == token}
    prefix = _hex_prefix(token)
    if prefix is not None:
        matches |= {f for f in people if f.startswith(prefix)}
    if len(matches) == 1:
        return matches.pop()
    if not matches:
        hint = "" if prefix or valid_name(token) else " (a name is letters, digits, _ . -)"
        raise UnknownPeer(
            f"no contact or known user {token!r}{hint}: use a full fingerprint, "
            "or /contact add NAME FINGERPRINT"
        )
    listed = sorted(_label(people[f]) for f in matches)
    more = f" and {len(listed) - MAX_LISTED} more" if len(listed) > MAX_LISTED else ""
    raise AmbiguousPeer(
        f"{token!r} matches {len(matches)} users: {', '.join(listed[:MAX_LISTED])}{more}; "
        "give more digits or a name"
    )

"""How people see an address: grouped hex, a short code, a QR code.

The address of a user is the hex SHA-256 of their Ed25519 public key. People
compare it out of band, so it is shown in groups that are easy to read aloud.
"""

from __future__ import annotations

import io
import string

import segno

from qpc_node.errors import LocalProtocolError

FPR_HEX_LEN = 64
QR_SCHEME = "qpc:"


def normalize(fpr: str) -> str:
    """Accept grouped, upper-case or ``qpc:``-prefixed input; return 64 lower hex chars."""
    s = fpr.strip().lower().removeprefix(QR_SCHEME)
    s = "".join(ch for ch in s if ch not in " :-_")
    if len(s) != FPR_HEX_LEN or any(ch not in string.hexdigits for ch in s):
        raise LocalProtocolError(f"not a fingerprint (want {FPR_HEX_LEN} hex digits): {fpr!r}")
    return s


def grouped(fpr: str, group: int = 4) -> str:
    s = normalize(fpr)
    return " ".join(s[i : i + group] for i in range(0, len(s), group))


def short_code(fpr: str) -> str:
    """First 8 hex digits: a handle for lists, not for verification."""
    s = normalize(fpr)
    return f"{s[:4]}-{s[4:8]}"


def qr_terminal(fpr: str) -> str:
    """A QR code of ``qpc:<fingerprint>`` drawn with block characters."""
    buf = io.StringIO()
    segno.make(QR_SCHEME + normalize(fpr), error="m").terminal(out=buf, compact=True)
    return buf.getvalue()

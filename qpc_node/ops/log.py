"""Structured, redacted logging.

One line per event, ``key=value`` (default) or JSON. A correlation id set per
RPC call (``correlation``) is stamped on every line logged inside that call, and
travels across node hops in the request. Secrets, keys, tokens, ciphertext and
message text never reach a log line: fields with such names are replaced by
``<redacted>`` and bytes are never printed, only their length.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

_correlation: contextvars.ContextVar[str] = contextvars.ContextVar("qpc_correlation", default="")

SENSITIVE = frozenset(
    {
        "secret",
        "key",
        "private_key",
        "passphrase",
        "password",
        "token",
        "ciphertext",
        "plaintext",
        "text",
        "body",
        "payload",
        "signature",
        "welcome",
        "key_package",
    }
)
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


def redact(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Drop what must never be logged; bytes become their length."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if k.lower() in SENSITIVE or any(s in k.lower() for s in ("secret", "passw", "token")):
            out[k] = "<redacted>"
        elif isinstance(v, bytes | bytearray | memoryview):
            out[k] = f"<{len(v)} bytes>"
        else:
            out[k] = v
    return out


@contextmanager
def correlation(cid: str) -> Iterator[None]:
    tok = _correlation.set(cid)
    try:
        yield
    finally:
        _correlation.reset(tok)


def current_correlation() -> str:
    return _correlation.get()


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}
    base: dict[str, Any] = {
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    cid = _correlation.get()
    if cid:
        base["cid"] = cid
    base.update(redact(extra))
    if record.exc_info and record.exc_info[0] is not None:
        base["exc"] = record.exc_info[0].__name__
    return base


def _kv_value(v: Any) -> str:
    s = str(v)
    if not s or any(c in s for c in ' ="\n'):
        return json.dumps(s)
    return s


class KvFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        return f"ts={ts} " + " ".join(f"{k}={_kv_value(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": record.created, **_fields(record)}
        return json.dumps(d, default=str, separators=(",", ":"))


def setup_logging(level: str = "info", fmt: str = "kv", stream: TextIO | None = None) -> None:
    """Configure our logger trees (idempotent: replaces our handler).

    ``qpc`` is where :func:`get_logger` puts loggers; modules that use
    ``logging.getLogger(__name__)`` live under ``qpc_node``. Both get the same
    redacting handler, so no line of ours escapes redaction.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KvFormatter())
    for name in ("qpc", "qpc_node"):
        root = logging.getLogger(name)
        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(handler)
        root.setLevel(level.upper())
        root.propagate = False


def get_logger(name: str) -> logging.Logger:
    """Loggers live under ``qpc.`` so one setup call governs them all."""
    return logging.getLogger(name if name.startswith("qpc") else f"qpc.{name}")

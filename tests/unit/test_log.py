import io
import json

from qpc_node.ops.log import correlation, get_logger, redact, setup_logging


def test_redacts_sensitive_and_bytes() -> None:
    out = redact({"ciphertext": b"abc", "method": "Enqueue", "blob": b"\x00" * 9, "api_token": "t"})
    assert out == {
        "ciphertext": "<redacted>",
        "method": "Enqueue",
        "blob": "<9 bytes>",
        "api_token": "<redacted>",
    }


def test_kv_line_with_correlation() -> None:
    buf = io.StringIO()
    setup_logging("debug", "kv", buf)
    log = get_logger("test")
    with correlation("c-123"):
        log.info("call done", extra={"method": "Health", "text": "hello secret world"})
    line = buf.getvalue().strip()
    assert "cid=c-123" in line and "method=Health" in line
    assert "hello secret world" not in line and "text=<redacted>" in line


def test_json_format_and_level() -> None:
    buf = io.StringIO()
    setup_logging("warning", "json", buf)
    log = get_logger("qpc.x")
    log.info("hidden")
    log.warning("shown", extra={"peer": "p1", "secret": b"k"})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert d["msg"] == "shown" and d["peer"] == "p1" and d["secret"] == "<redacted>"

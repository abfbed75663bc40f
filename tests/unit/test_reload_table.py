"""One table decides, for every config key, whether a reload applies it live or reports
it as needing a restart (qpc_node.node.RELOAD). A key added to a Config section
without a decision fails here; what each decision does is tested against a running
node in tests/integration/test_reload.py."""

from __future__ import annotations

import msgspec

from qpc_node.node import RELOAD, RESTART, Live, Node, config_keys
from qpc_node.ops.config import Config


def every_field_of_every_section() -> set[str]:
    """Walked here independently of config_keys(), from the Config struct itself."""
    keys: set[str] = set()
    for section in Config.__struct_fields__:
        section_type = type(getattr(Config(), section))
        assert issubclass(section_type, msgspec.Struct), section
        keys |= {f"{section}.{name}" for name in section_type.__struct_fields__}
    return keys


def test_every_config_key_has_exactly_one_decision() -> None:
    keys = every_field_of_every_section()
    assert len(keys) > 20  # the walk saw the sections
    assert keys - set(RELOAD) == set(), "config keys without a reload decision"
    assert set(RELOAD) - keys == set(), "reload decisions for keys that do not exist"
    assert set(config_keys()) == keys


def test_decisions_are_live_appliers_of_the_node_or_restart() -> None:
    for key, decision in RELOAD.items():
        assert decision is RESTART or isinstance(decision, Live), key
        if isinstance(decision, Live):
            name = getattr(decision.apply, "__name__", "")
            assert getattr(Node, name, None) is decision.apply, key


def test_the_keys_the_issue_names_have_a_decision() -> None:
    # Review finding: these were changed in cfg on reload but silently ignored.
    named = {
        "mls.ciphersuites",
        "limits.keypackage_ttl_s",
        "limits.mailbox_max_messages",
        "limits.mailbox_max_bytes",
        "limits.retention_s",
        "limits.max_connections",
        "limits.max_connections_per_ip",
        "metrics.listen",
    }
    assert named <= set(RELOAD)

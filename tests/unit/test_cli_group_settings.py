"""``qpc repl --committer-timeout``: the group failover delay is a client setting."""

from __future__ import annotations

import pytest

from qpc_node.cli import build_parser, group_config
from qpc_node.groups.core import GroupConfig


def test_committer_timeout_reaches_the_group_config() -> None:
    args = build_parser().parse_args(["repl", "--committer-timeout", "30"])
    cfg = group_config(args.committer_timeout)
    assert cfg is not None and cfg.committer_timeout_ms == 30_000
    assert GroupConfig().committer_timeout_ms != 30_000  # not the default by chance


def test_no_flag_keeps_the_defaults() -> None:
    args = build_parser().parse_args(["repl"])
    assert group_config(args.committer_timeout) is None


def test_a_bad_committer_timeout_is_refused() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["repl", "--committer-timeout", "0"])

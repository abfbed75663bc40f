from pathlib import Path

import msgspec
import pytest

from qpc_node.errors import ConfigError
from qpc_node.ops.config import (
    NOT_YET,
    Config,
    NotImplementedSetting,
    _from_strings,
    load_config,
    parse_hostport,
)


def test_defaults_need_no_file() -> None:
    cfg = load_config(env={})
    # Zero-config mesh (issue 12): every address, mDNS on, on the mesh.
    assert cfg.node.listen == "[::]:4201"
    assert cfg.mesh.mdns == "auto" and cfg.mdns_on and cfg.mesh_on
    assert cfg.limits.max_payload == 5 * 1024 * 1024
    assert cfg.limits.rate_per_second == 50
    assert cfg.limits.keypackage_ttl_s == 86400


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "qpc.toml"
    f.write_text(
        '[node]\nlisten = "[::]:5000"\n[limits]\nrate_burst = 7\n[log]\nlevel = "warning"\n'
    )
    cfg = load_config(f, env={"QPC_LIMITS_RATE_BURST": "9", "QPC_LOG": "debug"})
    assert cfg.node.listen == "[::]:5000"
    assert cfg.limits.rate_burst == 9
    assert cfg.log.level == "debug"
    cfg2 = load_config(
        f, env={"QPC_LIMITS_RATE_BURST": "9"}, overrides={"limits": {"rate_burst": "11"}}
    )
    assert cfg2.limits.rate_burst == 11


def test_a_commands_defaults_sit_under_file_env_and_flags(tmp_path: Path) -> None:
    quiet = {"log": {"level": "warning"}}  # `qpc`'s own default (cli._cmd_default)
    assert load_config(env={}, defaults=quiet).log.level == "warning"
    assert load_config(env={"QPC_LOG": "debug"}, defaults=quiet).log.level == "debug"
    assert load_config(env={"QPC_LOG_LEVEL": "error"}, defaults=quiet).log.level == "error"
    f = tmp_path / "qpc.toml"
    f.write_text('[log]\nlevel = "info"\n')
    assert load_config(f, env={}, defaults=quiet).log.level == "info"
    flags = {"log": {"level": "debug"}}
    assert load_config(env={}, overrides=flags, defaults=quiet).log.level == "debug"


def test_env_lists_are_comma_separated() -> None:
    # The coercion, for the list[str] keys the mesh issues will enable.
    raw = _from_strings({"mesh": {"static_peers": "10.0.0.1:4201, [fe80::1%mesh0]:4201"}})
    assert raw["mesh"]["static_peers"] == ["10.0.0.1:4201", "[fe80::1%mesh0]:4201"]
    assert load_config(env={"QPC_MLS_CIPHERSUITES": " 1,3 ,"}).mls.ciphersuites == [1, 3]


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"QPC_LIMITS_RATE_BURST": "many"}, "limits.rate_burst"),
        ({"QPC_LIMITS_RATE_BURST": "0"}, "limits"),
        ({"QPC_LOG_LEVEL": "loud"}, "log.level"),
        ({"QPC_NODE_LISTEN": "[::1:4201"}, "node"),
        ({"QPC_MESH_STATIC_PEERS": "300.1.1.1:1"}, "mesh"),
    ],
)
def test_errors_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(env=env)
    assert key in str(ei.value)


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "qpc.toml"
    f.write_text("[node]\nlisten_port = 1\n")
    with pytest.raises(ConfigError, match="listen_port"):
        load_config(f, env={})


def test_production_refuses_insecure() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        load_config(env={"QPC_NODE_PRODUCTION": "1", "QPC_METRICS_LISTEN": "0.0.0.0:9201"})
    cfg = load_config(env={"QPC_NODE_PRODUCTION": "1", "QPC_METRICS_LISTEN": "127.0.0.1:9201"})
    assert cfg.node.production


def test_not_yet_is_operator_pins_only() -> None:
    """Managed federation is wired (trust.py, node.py); only operator pins are refused."""
    assert set(NOT_YET) == {"federation.pinned"}


def test_a_setting_the_node_does_not_read_is_refused() -> None:
    with pytest.raises(NotImplementedSetting) as ei:
        load_config(env={"QPC_FEDERATION_PINNED": "ab" * 32})
    msg = str(ei.value)
    assert "federation.pinned" in msg and "not implemented yet" in msg
    assert isinstance(ei.value, ConfigError)  # the CLI prints it as a config error


def test_federation_defaults_in_a_file_still_load(tmp_path: Path) -> None:
    f = tmp_path / "qpc.toml"
    d = msgspec.to_builtins(Config().federation)
    f.write_text("[federation]" + "".join(f"\n{k} = {_toml(v)}" for k, v in d.items()) + "\n")
    cfg = load_config(f, env={})
    assert cfg.federation == Config().federation


@pytest.mark.parametrize(
    ("listen", "mdns", "on"),
    [
        ("[::]:4201", "auto", True),
        ("0.0.0.0:4201", "auto", True),
        ("10.0.0.1:4201", "auto", True),
        ("[fe80::1%mesh0]:4201", "auto", True),
        ("127.0.0.1:0", "auto", False),
        ("127.0.0.2:4201", "auto", False),
        ("[::1]:4201", "auto", False),
        ("[::ffff:127.0.0.1]:4201", "auto", False),
        ("localhost:4201", "auto", False),
        ("[::]:4201", "false", False),
        ("[::]:4201", "0", False),
        ("127.0.0.1:0", "true", True),  # explicit beats the loopback rule
        ("127.0.0.1:0", "on", True),
    ],
)
def test_mdns_auto_follows_the_listen_address(listen: str, mdns: str, on: bool) -> None:
    cfg = load_config(env={"QPC_NODE_LISTEN": listen, "QPC_MESH_MDNS": mdns})
    assert cfg.mdns_on is on and cfg.mesh_on is on
    assert cfg.mesh.mdns == ("auto" if mdns == "auto" else on)


def test_mdns_in_a_file_takes_bool_or_auto(tmp_path: Path) -> None:
    f = tmp_path / "qpc.toml"
    f.write_text('[node]\nlisten = "127.0.0.1:1"\n[mesh]\nmdns = "auto"\n')
    assert load_config(f, env={}).mdns_on is False
    f.write_text("[mesh]\nmdns = false\n")
    assert load_config(f, env={}).mdns_on is False
    f.write_text('[mesh]\nmdns = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"mesh\.mdns"):
        load_config(f, env={})


def test_managed_mode_needs_its_files_and_mesh_mode_refuses_them() -> None:
    with pytest.raises(
        ConfigError, match=r"managed needs federation\.ca, federation\.cert, federation\.key"
    ):
        load_config(env={"QPC_FEDERATION_MODE": "managed"})
    with pytest.raises(ConfigError, match=r"federation\.cert, federation\.key: only used with"):
        load_config(env={"QPC_FEDERATION_CERT": "/x.crt", "QPC_FEDERATION_KEY": "/x.key"})
    managed = {
        "QPC_FEDERATION_MODE": "managed",
        "QPC_FEDERATION_CA": "/etc/qpc/ca.pem",
        "QPC_FEDERATION_CERT": "/etc/qpc/node.crt",
        "QPC_FEDERATION_KEY": "/etc/qpc/node.key",
    }
    assert load_config(env=managed).federation.mode == "managed"
    # Managed mode on a node that is not on a mesh would silently do nothing.
    with pytest.raises(ConfigError, match="not on a mesh"):
        load_config(env={**managed, "QPC_NODE_LISTEN": "127.0.0.1:0"})


def test_production_refuses_a_federation_key_others_can_read(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    key.write_bytes(b"k")
    key.chmod(0o644)
    env = {
        "QPC_NODE_PRODUCTION": "1",
        "QPC_FEDERATION_MODE": "managed",
        "QPC_FEDERATION_CA": str(tmp_path / "ca.pem"),
        "QPC_FEDERATION_CERT": str(tmp_path / "node.crt"),
        "QPC_FEDERATION_KEY": str(key),
    }
    with pytest.raises(ConfigError, match=r"federation\.key: readable by other users"):
        load_config(env=env)
    key.chmod(0o600)
    assert load_config(env=env).node.production


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return f'"{v}"'


@pytest.mark.parametrize(
    ("s", "want"),
    [
        ("127.0.0.1:4201", ("127.0.0.1", 4201)),
        ("[::]:1", ("::", 1)),
        ("[fe80::1%mesh0]:4201", ("fe80::1%mesh0", 4201)),
        ("fe80::1", ("fe80::1", 4201)),
        ("node.local", ("node.local", 4201)),
        (":9", ("::", 9)),
    ],
)
def test_parse_hostport(s: str, want: tuple[str, int]) -> None:
    assert parse_hostport(s) == want


def test_ciphersuite_allowlist() -> None:
    assert load_config(env={}).mls.ciphersuites == [1]
    assert load_config(env={"QPC_MLS_CIPHERSUITES": "1, 3"}).mls.ciphersuites == [1, 3]
    with pytest.raises(ConfigError, match="mls"):
        load_config(env={"QPC_MLS_CIPHERSUITES": "0"})


def test_node_help_lists_every_key_and_marks_not_yet() -> None:
    from qpc_node.cli import NODE_EPILOG

    assert "host:port#nodefingerprint" in NODE_EPILOG
    for section in Config.__struct_fields__:
        names = getattr(Config(), section).__struct_fields__
        assert any(ln.split()[:1] == [section] for ln in NODE_EPILOG.splitlines()), section
        assert all(name in NODE_EPILOG for name in names), section
    for dotted in NOT_YET:
        name = dotted.split(".")[1]
        assert f"{name} (not yet" in " ".join(NODE_EPILOG.split()), dotted


def test_cli_refuses_a_not_yet_setting_with_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qpc_node.cli import main

    monkeypatch.setenv("QPC_FEDERATION_PINNED", "ab" * 32)
    rc = main(["node", "--listen", "127.0.0.1:0", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "federation.pinned" in err and "not implemented yet" in err
    assert not (tmp_path / "node.db").exists()  # refused before anything started


def test_local_only_keeps_the_node_on_loopback_without_mesh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qpc_node.cli import _load_cfg, build_parser

    fpr = "ab" * 32
    conf = tmp_path / "qpc.toml"
    conf.write_text(f'[mesh]\nmdns = true\nstatic_peers = ["10.0.0.1:4201#{fpr}"]\n')
    for argv in (["--local-only"], ["node", "--local-only", "--config", str(conf)]):
        cfg = _load_cfg(build_parser().parse_args(argv))
        assert cfg.node.listen == "127.0.0.1:4201"
        assert cfg.mesh.mdns is False and cfg.mesh.static_peers == []
        assert not cfg.mdns_on and not cfg.mesh_on
    assert "ignoring 1 static peer" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--local-only and --listen"):
        _load_cfg(build_parser().parse_args(["node", "--local-only", "--listen", "[::]:1"]))
    # Without it, the same config puts the node on the mesh.
    cfg = _load_cfg(build_parser().parse_args(["node", "--config", str(conf)]))
    assert cfg.mesh_on and cfg.node.listen == "[::]:4201"


def test_mesh_keys_load_and_static_peers_are_checked() -> None:
    fpr = "ab" * 32
    cfg = load_config(
        env={
            "QPC_MESH_STATIC_PEERS": f"10.0.0.1:4201#{fpr}, [fe80::1%mesh0]:4201#{fpr}",
            "QPC_MESH_INTERFACES": "mesh0",
            "QPC_MESH_MDNS": "1",
        }
    )
    assert cfg.mesh.enabled and cfg.mesh.interfaces == ["mesh0"]
    assert not Config().mesh.enabled  # only "auto": mesh_on resolves it
    assert Config().mesh_on
    with pytest.raises(ConfigError, match="nodefingerprint"):
        load_config(env={"QPC_MESH_STATIC_PEERS": "10.0.0.1:4201"})


def test_relay_custody_per_user_loads_and_reaches_the_federation_limits() -> None:
    from qpc_node.mesh.service import settings_from_config

    assert Config().limits.relay_custody_per_user == 1_000
    cfg = load_config(env={"QPC_LIMITS_RELAY_CUSTODY_PER_USER": "40"})
    assert cfg.limits.relay_custody_per_user == 40
    settings = settings_from_config([], True, [], relay_custody_per_user=40)
    assert settings.limits is not None and settings.limits.queue.max_per_origin == 40
    with pytest.raises(ConfigError, match="limits"):
        load_config(env={"QPC_LIMITS_RELAY_CUSTODY_PER_USER": "0"})


def test_storefwd_and_carrier_keys() -> None:
    """storefwd.* and mesh.carrier reach the hold policy; bad values name the key."""
    from qpc_node.ops.config import load_config

    default = load_config(env={})
    assert default.mesh.carrier is False
    p = default.storefwd.policy(carrier=default.mesh.carrier)
    assert (p.max_held, p.held_per_origin, p.max_expiry_ahead_s) == (10_000, 1_000, 7 * 86400)
    assert (p.spray_tokens, p.spray_delay_s, p.reroute_after_s) == (4, 300.0, 60.0)
    cfg = load_config(
        env={
            "QPC_MESH_CARRIER": "true",
            "QPC_STOREFWD_MAX_HELD": "50",
            "QPC_STOREFWD_SPRAY_DELAY_S": "1.5",
        }
    )
    p = cfg.storefwd.policy(carrier=cfg.mesh.carrier)
    assert p.carrier and p.max_held == 50 and p.held_per_origin == 50 and p.spray_delay_s == 1.5
    for key, value in (
        ("QPC_STOREFWD_SPRAY_TOKENS", "0"),
        ("QPC_STOREFWD_MAX_EXPIRY_AHEAD_S", "0"),
        ("QPC_STOREFWD_REROUTE_AFTER_S", "0"),
    ):
        with pytest.raises(ConfigError, match="storefwd"):
            load_config(env={key: value})

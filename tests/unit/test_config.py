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
    assert cfg.node.listen == "127.0.0.1:4201"
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


def not_yet_keys() -> list[tuple[str, str, str]]:
    """(section, key, a non-default value as an env string) for every NOT_YET key."""
    out: list[tuple[str, str, str]] = []
    for section in NOT_YET:
        default = getattr(Config(), section)
        for name in default.__struct_fields__:
            value = getattr(default, name)
            if isinstance(value, bool):
                text = "false" if value else "true"
            elif isinstance(value, list):
                text = "10.0.0.1:4201"
            elif name == "mode":
                text = "managed"
            else:
                text = "/etc/qpc/x.pem"
            out.append((section, name, text))
    return out


def test_not_yet_covers_federation_only() -> None:
    """The mesh section is wired (mesh/service.py); federation's default (mesh mode) is
    what it runs, so only managed mode and pins are refused."""
    assert set(NOT_YET) == {"federation"}
    assert len(not_yet_keys()) == 5


@pytest.mark.parametrize(("section", "name", "text"), not_yet_keys())
def test_a_setting_the_node_does_not_read_is_refused(section: str, name: str, text: str) -> None:
    with pytest.raises(NotImplementedSetting) as ei:
        load_config(env={f"QPC_{section.upper()}_{name.upper()}": text})
    msg = str(ei.value)
    assert f"{section}.{name}" in msg and "not implemented yet" in msg
    assert isinstance(ei.value, ConfigError)  # the CLI prints it as a config error


def test_not_yet_settings_in_a_file_are_refused_by_name(tmp_path: Path) -> None:
    f = tmp_path / "qpc.toml"
    f.write_text('[federation]\nca = "/etc/qpc/ca.pem"\npinned = ["ab"]\n')
    with pytest.raises(NotImplementedSetting, match=r"federation\.ca.*federation\.pinned"):
        load_config(f, env={})


def test_not_yet_sections_at_their_defaults_still_load(tmp_path: Path) -> None:
    f = tmp_path / "qpc.toml"
    defaults = {s: msgspec.to_builtins(getattr(Config(), s)) for s in NOT_YET}
    lines = [
        f"[{s}]" + "".join(f"\n{k} = {_toml(v)}" for k, v in d.items()) for s, d in defaults.items()
    ]
    f.write_text("\n".join(lines) + "\n")
    cfg = load_config(f, env={"QPC_MESH_MDNS": "0"})
    assert cfg.mesh == Config().mesh and cfg.federation == Config().federation
    assert cfg.mesh.mdns is False  # nothing announces: the default says so


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

    supported, _, not_yet = NODE_EPILOG.partition("not yet:")
    assert "host:port#nodefingerprint" in supported
    for section in Config.__struct_fields__:
        names = getattr(Config(), section).__struct_fields__
        if section in NOT_YET:
            assert f"{section}.*" in not_yet, section
            assert all(name in not_yet for name in names), section
        else:
            assert any(ln.split()[:1] == [section] for ln in supported.splitlines()), section
            assert all(name in supported for name in names), section


def test_cli_refuses_a_not_yet_setting_with_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qpc_node.cli import main

    monkeypatch.setenv("QPC_FEDERATION_MODE", "managed")
    rc = main(["node", "--listen", "127.0.0.1:0", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "federation.mode" in err and "not implemented yet" in err
    assert not (tmp_path / "node.db").exists()  # refused before anything started


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
    assert not Config().mesh.enabled
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

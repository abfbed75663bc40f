from pathlib import Path

import pytest

from qpc_node.errors import ConfigError
from qpc_node.ops.config import load_config, parse_hostport


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
    cfg = load_config(env={"QPC_MESH_STATIC_PEERS": "10.0.0.1:4201, [fe80::1%mesh0]:4201"})
    assert cfg.mesh.static_peers == ["10.0.0.1:4201", "[fe80::1%mesh0]:4201"]


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


def test_production_refuses_insecure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        load_config(env={"QPC_NODE_PRODUCTION": "1", "QPC_METRICS_LISTEN": "0.0.0.0:9201"})
    with pytest.raises(ConfigError, match="federation"):
        load_config(env={"QPC_NODE_PRODUCTION": "yes", "QPC_FEDERATION_MODE": "managed"})
    key = tmp_path / "k.pem"
    key.write_text("x")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="readable"):
        load_config(
            env={
                "QPC_NODE_PRODUCTION": "1",
                "QPC_FEDERATION_MODE": "managed",
                "QPC_FEDERATION_CA": "ca.pem",
                "QPC_FEDERATION_CERT": "c.pem",
                "QPC_FEDERATION_KEY": str(key),
            }
        )


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

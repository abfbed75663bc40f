"""One configuration schema for the TOML file, ``QPC_*`` environment and flags.

Precedence: embedded defaults < TOML file < environment < command-line flags.
Every value is validated once, here; an error names the key that is wrong
(``limits.rate_per_second: expected int, got str``), so an operator editing
UCI or TOML on a router sees what to fix.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from qpc_node.errors import ConfigError
from qpc_node.mesh.static_peers import parse_static_peers
from qpc_node.storefwd.held import HoldPolicy

DEFAULT_PORT = 4201
ENV_PREFIX = "QPC_"


def parse_hostport(value: str, *, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``[fe80::1%mesh0]:port``, bare host or ``:port``."""
    v = value.strip()
    if not v:
        raise ValueError("empty address")
    if v.startswith("["):
        host, sep, rest = v[1:].partition("]")
        if not sep:
            raise ValueError(f"unclosed '[' in {value!r}")
        port_s = rest.removeprefix(":") if rest else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after ']' in {value!r}")
    elif v.count(":") > 1:  # bare IPv6 without port
        host, port_s = v, ""
    else:
        host, _, port_s = v.partition(":")
    port = int(port_s) if port_s else default_port
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    if not host:
        host = "::"
    if ":" in host or host.replace(".", "").isdigit():
        ipaddress.ip_address(host.split("%", 1)[0])  # raises ValueError when malformed
    return host, port


MdnsSetting = bool | Literal["auto"]

LOCAL_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
"""What ``--local-only`` listens on (a laptop node nobody else can reach)."""


def is_loopback_host(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` (also v4-mapped) or ``localhost``; not ``::``/``0.0.0.0``."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class NodeSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Every address, dual-stack: with no config a node is reachable by the mesh
    # (issue 12: zero-config discovery); ``--local-only`` keeps it on loopback.
    listen: str = f"[::]:{DEFAULT_PORT}"
    data_dir: str = ""
    key_dir: str = ""
    production: bool = False
    # SIGTERM: seconds running calls get to finish before connections close.
    drain_grace_s: float = 10.0

    def __post_init__(self) -> None:
        parse_hostport(self.listen)
        if not 0 <= self.drain_grace_s <= 300:
            raise ValueError("drain_grace_s must be within 0..300")


class LogSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["kv", "json"] = "kv"


class MetricsSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # "" disables the endpoint (routers); laptops default to loopback.
    listen: str = f"127.0.0.1:{9201}"

    def __post_init__(self) -> None:
        if self.listen:
            parse_hostport(self.listen, default_port=9201)


class LimitsSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_payload: int = 5 * 1024 * 1024
    rate_per_second: float = 50.0
    rate_burst: int = 100
    mailbox_max_messages: int = 10_000
    mailbox_max_bytes: int = 256 * 1024 * 1024
    max_connections: int = 1024
    max_connections_per_ip: int = 64
    # QUIC handshakes in flight (not counted in max_connections), their deadline,
    # and how many may be in flight before new clients must pass a Retry.
    max_half_open: int = 256
    max_half_open_per_ip: int = 16
    half_open_timeout_s: float = 5.0
    retry_threshold: int = 32
    keypackage_ttl_s: int = 24 * 3600
    retention_s: int = 7 * 24 * 3600
    # Node-wide caps on bytes a peer decides the size of (docs/threat-model.md):
    # request frames held (reading + handling), responses waiting for the peer's
    # flow control; each with one remote IP's (IPv6 /64's) share. Over a cap the
    # call gets RESOURCE_EXHAUSTED (retriable). A share must hold one max_payload.
    rpc_buffer_bytes: int = 24 * 1024 * 1024
    rpc_buffer_bytes_per_ip: int = 8 * 1024 * 1024
    send_queue_bytes: int = 24 * 1024 * 1024
    send_queue_bytes_per_ip: int = 8 * 1024 * 1024
    # A response not taken by the peer within this is dropped (stream reset).
    send_timeout_s: float = 30.0
    # Relayed envelopes one local user may have in this node's federation custody
    # (mail to users homed elsewhere not yet taken by the next hop): one user
    # flooding remote users cannot use up the room every local user shares.
    relay_custody_per_user: int = 1_000

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for share, total in (
            ("rpc_buffer_bytes_per_ip", "rpc_buffer_bytes"),
            ("send_queue_bytes_per_ip", "send_queue_bytes"),
        ):
            if getattr(self, share) > getattr(self, total):
                raise ValueError(f"{share} must be <= {total}")
            if getattr(self, share) < self.max_payload + 64 * 1024:
                raise ValueError(f"{share} must hold one max_payload (+ 64 KiB framing)")


class MlsSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    # Ciphersuite allowlist for KeyPackages the directory accepts (seeds policy).
    # 1 = MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519.
    ciphersuites: list[int] = msgspec.field(default_factory=lambda: [1])

    def __post_init__(self) -> None:
        if not self.ciphersuites or any(not 0 < c < 0x10000 for c in self.ciphersuites):
            raise ValueError("ciphersuites must be a non-empty list of 16-bit suite ids")


class MeshSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The mesh (qpc_node/mesh/service.py). The node joins it when ``mdns`` is on or
    ``static_peers`` names a peer: it then accepts and dials federation links
    (mesh-mode trust: first use of a node id pins it), routes and relays."""

    # On, the node announces itself and browses on ``interfaces`` (empty: every
    # non-loopback interface that is up). "auto" (the default): on unless the node
    # listens on a loopback address only (nobody else could reach it anyway), so a
    # laptop with no config discovers its LAN and a test node on 127.0.0.1 stays quiet.
    mdns: MdnsSetting = "auto"
    interfaces: list[str] = msgspec.field(default_factory=list)
    # ``host:port#nodefingerprint`` (qpc_node/mesh/static_peers.py), the fingerprint
    # pinning the node: for meshes where multicast is filtered.
    static_peers: list[str] = msgspec.field(default_factory=list)
    # This node may carry held copies between mesh islands (a laptop): it says so in
    # every federation Ping, and holders spray copies of what they hold to it
    # (qpc_node/storefwd/forward.py).
    carrier: bool = False

    def __post_init__(self) -> None:
        try:
            parse_static_peers(self.static_peers)
        except ConfigError as exc:  # as ValueError msgspec names the key: mesh.static_peers
            raise ValueError(str(exc)) from None
        if any(not name or "/" in name for name in self.interfaces):
            raise ValueError("interfaces must be interface names")

    @property
    def enabled(self) -> bool:
        """Explicitly on (``mdns = true`` or a static peer); :attr:`Config.mesh_on`
        also resolves ``mdns = "auto"`` against ``node.listen``."""
        return self.mdns is True or bool(self.static_peers)


class StorefwdSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Store-and-forward (qpc_node/storefwd/): envelopes for users whose home node
    has no route yet are held here and forwarded when one appears."""

    # Envelopes held in total, and those that entered the mesh at one node.
    max_held: int = 10_000
    held_per_origin: int = 1_000
    # Expiries further ahead than this are refused (at entry and at relays).
    max_expiry_ahead_s: int = 7 * 24 * 3600
    # Custody toward a next hop down this long is routed again (or held).
    reroute_after_s: float = 60.0
    # Binary spray-and-wait to carrier neighbours (mesh.carrier): copies per held
    # envelope, and how long it is held before the first copy goes.
    spray_tokens: int = 4
    spray_delay_s: float = 300.0

    def __post_init__(self) -> None:
        try:
            self.policy(carrier=False)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def policy(self, *, carrier: bool) -> HoldPolicy:
        return HoldPolicy(
            max_held=self.max_held,
            # (a small max_held alone must not need held_per_origin lowered too)
            held_per_origin=min(self.held_per_origin, self.max_held),
            max_expiry_ahead_s=self.max_expiry_ahead_s,
            reroute_after_s=self.reroute_after_s,
            spray_tokens=self.spray_tokens,
            spray_delay_s=self.spray_delay_s,
            carrier=carrier,
        )


class FederationSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How a node decides whom it federates with (qpc_node/federation/trust.py).

    ``mesh`` (default): trust on first use of a node id, pinned in the store; a
    changed key is refused until ``qpc trust FPR``. ``managed``: a community CA;
    ``ca`` is its certificate (PEM), ``cert``/``key`` the node's CA-issued
    certificate (chain) and Ed25519 key. In managed mode that pair *is* the
    node's identity: it replaces ``node.crt``/``node.key`` of the key dir for
    the whole socket, so the node id (mDNS, routes, bindings) is the SHA-256 of
    ``key``'s public key and clients pin ``cert``. Operator pins (``pinned``)
    are not wired (NOT_YET): ``mesh.static_peers`` pins nodes.
    """

    mode: Literal["mesh", "managed"] = "mesh"
    ca: str = ""
    cert: str = ""
    key: str = ""
    pinned: list[str] = msgspec.field(default_factory=list)


class ChannelsSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Broadcast channel messages this node holds and relays (store/channels.py,
    wire/channel.py): it cannot read them, so these are its only levers."""

    # Held for clients and neighbours until min(sender's expiry, arrival + this).
    retention_s: int = 48 * 3600
    # Caps on what is held; past them the message due to go soonest is evicted first.
    max_messages: int = 20_000
    max_bytes: int = 64 * 1024 * 1024
    # Refused: an expiry further ahead than this, a sealed part larger than this.
    max_expiry_s: int = 7 * 24 * 3600
    max_message_bytes: int = 16 * 1024
    # Channel/Publish calls per second one session may make (burst: 4x, at least 1).
    publish_rate: float = 5.0

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if not 512 <= self.max_message_bytes <= self.max_bytes:
            # A sealed message is padded to 256-byte buckets plus nonce and tag: the
            # smallest one is 284 bytes.
            raise ValueError("max_message_bytes must be within 512..max_bytes")


class SyncSection(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Inventory sync with neighbours (qpc_node/storefwd/syncer.py): on every federation
    link-up and every ``interval_s`` seconds (jittered by +-25 %) with one random
    neighbour, the node reconciles what it holds (channel messages within retention,
    held envelopes and receipts) and moves only the difference."""

    interval_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.interval_s <= 86_400.0:
            raise ValueError("interval_s must be within 1..86400 seconds")


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    node: NodeSection = msgspec.field(default_factory=NodeSection)
    log: LogSection = msgspec.field(default_factory=LogSection)
    metrics: MetricsSection = msgspec.field(default_factory=MetricsSection)
    limits: LimitsSection = msgspec.field(default_factory=LimitsSection)
    mls: MlsSection = msgspec.field(default_factory=MlsSection)
    mesh: MeshSection = msgspec.field(default_factory=MeshSection)
    federation: FederationSection = msgspec.field(default_factory=FederationSection)
    channels: ChannelsSection = msgspec.field(default_factory=ChannelsSection)
    storefwd: StorefwdSection = msgspec.field(default_factory=StorefwdSection)
    sync: SyncSection = msgspec.field(default_factory=SyncSection)

    @property
    def mdns_on(self) -> bool:
        """``mesh.mdns`` resolved: "auto" is on unless ``node.listen`` is loopback."""
        if self.mesh.mdns == "auto":
            host, _ = parse_hostport(self.node.listen)
            return not is_loopback_host(host)
        return self.mesh.mdns

    @property
    def mesh_on(self) -> bool:
        """The node joins the mesh: mDNS (resolved) or a static peer."""
        return self.mdns_on or bool(self.mesh.static_peers)


_SECTIONS: dict[str, type[msgspec.Struct]] = {
    name: typ
    for name, typ in (
        ("node", NodeSection),
        ("log", LogSection),
        ("metrics", MetricsSection),
        ("limits", LimitsSection),
        ("mls", MlsSection),
        ("mesh", MeshSection),
        ("federation", FederationSection),
        ("channels", ChannelsSection),
        ("storefwd", StorefwdSection),
        ("sync", SyncSection),
    )
}
NOT_YET: dict[str, str] = {
    "federation.pinned": "operator pins (mesh.static_peers pins a node by its id)",
}
"""Keys the schema already has but the node does not read yet. A non-default value
is refused (NotImplementedSetting) instead of being accepted and doing nothing; the
defaults stay loadable, so files, UCI and env that leave them alone keep working. The
mesh issues remove entries here as they wire each section."""


class NotImplementedSetting(ConfigError):
    """A setting the node has no code for yet (``mesh.*``, ``federation.*``)."""


# Short aliases people type: QPC_LOG=debug rather than QPC_LOG_LEVEL.
_ENV_ALIASES = {"QPC_LOG": "log.level", "QPC_LISTEN": "node.listen", "QPC_DATA": "node.data_dir"}


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = dict(_ENV_ALIASES)
    for section, typ in _SECTIONS.items():
        for field in typ.__struct_fields__:
            keys[f"{ENV_PREFIX}{section.upper()}_{field.upper()}"] = f"{section}.{field}"
    for var, dotted in keys.items():
        if var not in env:
            continue
        value = env[var]
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
            raise ConfigError(f"{var}: not valid UTF-8") from None
        section, field = dotted.split(".")
        out.setdefault(section, {})[field] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Mapping[str, Any]]) -> None:
    for section, values in over.items():
        target = base.setdefault(section, {})
        if not isinstance(values, Mapping) or not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a table")
        target.update(values)


def _from_strings(raw: dict[str, Any]) -> dict[str, Any]:
    """Coerce env/flag strings to the field types (lists are comma-separated)."""
    out: dict[str, Any] = {}
    for section, values in raw.items():
        typ = _SECTIONS.get(section)
        fields = msgspec.structs.fields(typ) if typ else ()
        types = {f.name: f.type for f in fields}
        sec: dict[str, Any] = {}
        for k, v in values.items():
            t = types.get(k)
            if isinstance(v, str) and t is not None and t is not str:
                if t == list[str]:
                    v = [x.strip() for x in v.split(",") if x.strip()]
                elif t == list[int]:
                    v = [_int(section, k, x.strip()) for x in v.split(",") if x.strip()]
                elif t == MdnsSetting:
                    v = "auto" if v.strip().lower() == "auto" else _bool(v)
                elif t is bool:
                    v = _bool(v)
                elif t is int:
                    v = _int(section, k, v)
                elif t is float:
                    v = _float(section, k, v)
            sec[k] = v
        out[section] = sec
    return out


def _bool(v: str) -> bool:
    return v.strip().lower() in {"1", "true", "yes", "on"}


def _int(section: str, key: str, v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"{section}.{key}: expected an integer, got {v!r}") from None


def _float(section: str, key: str, v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise ConfigError(f"{section}.{key}: expected a number, got {v!r}") from None


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the effective configuration; raise ConfigError naming the bad key.

    Layers, lowest first: the built-in defaults, ``defaults`` (a command's own, e.g.
    ``qpc``'s quieter log level), the file, ``QPC_*`` variables, ``overrides`` (flags)."""
    merged: dict[str, Any] = {}
    if path is not None:
        # Here, not at the top: a router's node is configured by UCI flags and QPC_*
        # variables, not a TOML file, and tomllib's regexes cost ~10 ms of every start.
        import tomllib

        try:
            with path.open("rb") as f:
                merged = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    _merge(merged, _from_strings(_env_overrides(os.environ if env is None else env)))
    if overrides:
        _merge(merged, _from_strings({k: dict(v) for k, v in overrides.items()}))
    for section, values in _from_strings({k: dict(v) for k, v in (defaults or {}).items()}).items():
        target = merged.setdefault(section, {})
        if isinstance(target, dict):  # else msgspec names the bad section below
            for key, value in values.items():
                target.setdefault(key, value)
    try:
        cfg = msgspec.convert(merged, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_humanize(str(exc))) from None
    check_implemented(cfg)
    check_production(cfg)
    return cfg


def check_implemented(cfg: Config) -> None:
    """Refuse a non-default value of a key the node does not read yet (NOT_YET)."""
    problems: list[str] = []
    for dotted, what in NOT_YET.items():
        section, name = dotted.split(".")
        current = getattr(cfg, section)
        if getattr(current, name) != getattr(type(current)(), name):
            problems.append(f"{dotted}: not implemented yet ({what}); remove the setting")
    if problems:
        raise NotImplementedSetting("; ".join(problems))
    check_federation(cfg)


def check_federation(cfg: Config) -> None:
    """Managed mode needs its three files and a mesh; mesh mode takes none of them.

    A load-time check (not ``__post_init__``): one key alone is not wrong, the
    combination is, and a reload compares keys one by one."""
    fed = cfg.federation
    files = {"ca": fed.ca, "cert": fed.cert, "key": fed.key}
    if fed.mode == "managed":
        missing = [f"federation.{k}" for k, v in files.items() if not v]
        if missing:
            raise ConfigError(f"federation.mode = managed needs {', '.join(missing)} (PEM files)")
    else:
        given = [f"federation.{k}" for k, v in files.items() if v]
        if given:
            raise ConfigError(f"{', '.join(given)}: only used with federation.mode = managed")
    if fed.mode == "managed" and not cfg.mesh_on:
        raise ConfigError(
            "federation.mode = managed: the node is not on a mesh (mesh.mdns is off or "
            "auto on a loopback node.listen, and no mesh.static_peers)"
        )


def _humanize(msg: str) -> str:
    """msgspec says '... - at `$.limits.rate_burst`'; lead with the key instead."""
    text, sep, where = msg.rpartition(" - at `$.")
    if not sep:
        return msg
    return f"{where.rstrip('`')}: {text}"


def check_production(cfg: Config) -> None:
    """In production mode refuse settings that are fine on a laptop but not on a server."""
    if not cfg.node.production:
        return
    problems: list[str] = []
    if cfg.federation.mode == "managed":
        # The federation key is the node's identity: readable by others, it is theirs.
        try:
            mode = Path(cfg.federation.key).stat().st_mode
        except OSError as exc:
            problems.append(f"federation.key: {exc.strerror}")
        else:
            if mode & 0o077:
                problems.append("federation.key: readable by other users (chmod 600)")
    if cfg.metrics.listen:
        host, _ = parse_hostport(cfg.metrics.listen, default_port=9201)
        if host not in {"127.0.0.1", "::1", "localhost"}:
            problems.append("metrics.listen: non-loopback metrics without auth")
    if problems:
        raise ConfigError("production mode refuses: " + "; ".join(problems))

"""Network namespaces for mesh tests: hosts on bridges, like routers on a mesh cloud.

A ``Netns`` kit owns everything it makes under one unique prefix (pid + random),
so parallel runs never clash, and removes it all on exit: processes started in
its namespaces are killed, the namespaces deleted (their veth ends and the
bridge go with them). Cleanup also runs from ``atexit`` in case the test process
is interrupted, and ``sweep_stale`` removes what a SIGKILLed run left behind.

Layout: every bridge lives in the kit's own "switch" namespace (never in the root
namespace, so nothing leaks into the machine's network); each host is a namespace
with one interface per bridge it joins, named ``mesh0``, ``mesh1``...
IPv6 link-local addresses are the kernel's own (EUI-64 from the veth MAC), with
duplicate address detection off so they are usable as soon as the link is up.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

PREFIX_ROOT = "qpcm"


class NetnsUnavailable(Exception):
    """Not root, or no ``ip`` (the reason says which)."""


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    return None


def require_netns() -> None:
    """Skip with the reason where namespaces cannot be made; fail in CI
    (tests/ci_needs.py)."""
    from tests.ci_needs import unavailable

    reason = unavailable_reason()
    if reason is not None:
        unavailable("mesh tests", reason)


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


@dataclass
class Link:
    host: Host
    dev: str  # name inside the host namespace
    port: str  # bridge-side name, in the switch namespace
    bridge: str
    ipv4: str | None  # "10.x.y.z" (without prefix length) or None
    ifindex: int = 0
    link_local: str = ""


@dataclass
class Host:
    kit: Netns
    name: str
    ns: str
    links: list[Link] = field(default_factory=list)

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start a process in the namespace; the kit kills it at cleanup if still running."""
        kw.setdefault("text", True)
        p = subprocess.Popen(self.cmd(argv), **kw)
        self.kit.procs.append(p)
        return p

    def ipv4_addresses(self) -> list[str]:
        """Every IPv4 address in the namespace but loopback's (``[]`` on IPv6-only hosts)."""
        out = _ip("-n", self.ns, "-4", "-o", "addr", "show").stdout.splitlines()
        return [line.split()[3] for line in out if line.split()[1] != "lo"]

    def link(self, dev: str = "mesh0") -> Link:
        return next(link for link in self.links if link.dev == dev)


class Netns:
    """``with Netns() as net: a = net.host("a"); net.connect(a, "br0", ipv4=True)``."""

    def __init__(self, *, ipv4_net: int | None = None) -> None:
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        tag = secrets.token_hex(2)
        self.prefix = f"{PREFIX_ROOT}{os.getpid()}-{tag}-"
        # 10.N.M.0/24 per bridge; N from the tag so two runs rarely share a prefix
        # (and they could not collide anyway: each kit has its own namespaces).
        self.ipv4_net = ipv4_net if ipv4_net is not None else 100 + int(tag, 16) % 100
        self.switch = f"{self.prefix}sw"
        self.hosts: dict[str, Host] = {}
        self.bridges: dict[str, int] = {}
        self.procs: list[subprocess.Popen[str]] = []
        self._cleanups: list[Callable[[], None]] = []
        self._namespaces: list[str] = []
        self._closed = False
        self._ports = 0

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> Netns:
        atexit.register(self.close)
        try:
            self._add_ns(self.switch)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        atexit.unregister(self.close)

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        for key in ("all", "default"):
            _run(
                ["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=0"]
            )
            _run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0"])

    def close(self) -> None:
        """Kill our processes, delete our namespaces. Idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        for fn in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                fn()
        for p in self.procs:
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        for ns in reversed(self._namespaces):
            # anything else still running in there was started by a test through us
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", ns, check=False)
        self._namespaces.clear()

    # -- topology -------------------------------------------------------------------

    def bridge(self, name: str) -> str:
        """A bridge (an L2 segment) in the switch namespace; created on first use."""
        if name not in self.bridges:
            # forward_delay 0 + no STP: ports forward at once; multicast snooping stays
            # at the kernel default (on), as on a real router's bridge
            _ip("-n", self.switch, "link", "add", name, "type", "bridge", "stp_state", "0")
            _ip("-n", self.switch, "link", "set", name, "type", "bridge", "forward_delay", "0")
            _ip("-n", self.switch, "link", "set", name, "up")
            self.bridges[name] = len(self.bridges)
        return name

    def host(self, name: str) -> Host:
        ns = f"{self.prefix}{name}"
        self._add_ns(ns)
        h = Host(self, name, ns)
        self.hosts[name] = h
        return h

    def connect(self, host: Host, bridge: str, *, ipv4: bool = True) -> Link:
        """A veth from ``host`` into ``bridge``: IPv4 10.N.B.H/24 if asked, IPv6
        link-local always (no global IPv6: the mesh must work without it)."""
        self.bridge(bridge)
        dev = f"mesh{len(host.links)}"
        self._ports += 1
        port = f"p{self._ports}"  # the switch namespace is ours: no clash possible
        # one ip(8) call creates both ends directly in their namespaces
        _ip(
            "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", dev,
            "netns", host.ns,
        )  # fmt: skip
        _ip("-n", self.switch, "link", "set", port, "master", bridge, "up")
        _run(["ip", "netns", "exec", host.ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0"])
        addr = None
        if ipv4:
            addr = f"10.{self.ipv4_net}.{self.bridges[bridge]}.{len(self.hosts_on(bridge)) + 1}"
            _ip("-n", host.ns, "addr", "add", f"{addr}/24", "dev", dev)
        _ip("-n", host.ns, "link", "set", dev, "up")
        link = Link(host, dev, port, bridge, addr)
        host.links.append(link)
        self._wait_link_local(link)
        return link

    def hosts_on(self, bridge: str) -> list[Host]:
        return [h for h in self.hosts.values() for link in h.links if link.bridge == bridge]

    def _wait_link_local(self, link: Link, timeout: float = 10.0) -> None:
        """Bounded wait for the kernel's fe80:: address (needs carrier on both ends)."""
        end = time.monotonic() + timeout
        while True:
            out = _ip("-n", link.host.ns, "-j", "-6", "addr", "show", "dev", link.dev).stdout
            for entry in json.loads(out or "[]"):
                for a in entry.get("addr_info", []):
                    if a.get("scope") == "link" and not a.get("tentative"):
                        link.ifindex = int(entry["ifindex"])
                        link.link_local = str(a["local"])
                        return
            if time.monotonic() > end:
                raise RuntimeError(f"{link.host.ns}/{link.dev}: no link-local address")
            time.sleep(0.05)

    def set_link(self, link: Link, up: bool) -> None:
        """Cable pulled / plugged: the host's side of the veth goes down or up."""
        _ip("-n", link.host.ns, "link", "set", link.dev, "up" if up else "down")
        if up:
            self._wait_link_local(link)

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run at close, after our processes are dead and before the namespaces go."""
        self._cleanups.append(fn)

    def namespaces(self) -> list[str]:
        return list(self._namespaces)


def live_namespaces(prefix: str = PREFIX_ROOT) -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def sweep_stale(prefix: str = PREFIX_ROOT) -> list[str]:
    """Delete namespaces a killed run left behind: ``qpcm<pid>-<tag>-...`` whose pid
    is no longer alive (live runs are never touched)."""
    removed = []
    for ns in live_namespaces(prefix):
        pid = ns[len(prefix) :].partition("-")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", ns, check=False)
        removed.append(ns)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def netns() -> Iterator[Netns]:
    with Netns() as kit:
        yield kit

"""``statistics()`` everywhere returns one typed, frozen snapshot, and the metrics layer
reads it so that a renamed field is a ``mypy --strict`` error, not a silent zero.

Two halves:
- every class in qpc_node with a ``statistics()`` method (found by walking the package,
  so a new component is covered without editing this file) declares a frozen, slotted,
  typed result -- no dicts, no mutable counters handed out;
- mypy itself is run on generated code: for every field that ops/metrics.py reads
  (walked from ``NodeView`` through the source Protocols), a node whose statistics type
  lacks exactly that field must be refused where it is handed to ``NodeMetrics``. A
  control node with all fields must pass, so the refusals are about the fields. The
  same run checks test_metrics.py, whose sources use the real statistics types.
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

import qpc_node
from qpc_node.ops import metrics

MUTABLE = (dict, list, set, collections.Counter, bytearray)


def components_with_statistics() -> list[type]:
    found: list[type] = []
    for info in pkgutil.walk_packages(qpc_node.__path__, "qpc_node."):
        if ".wire.gen" in info.name:
            continue
        mod = importlib.import_module(info.name)
        for cls in vars(mod).values():
            if (
                inspect.isclass(cls)
                and cls.__module__ == mod.__name__
                and callable(getattr(cls, "statistics", None))
                and not getattr(cls, "_is_protocol", False)
            ):
                found.append(cls)
    return found


COMPONENTS = components_with_statistics()


def test_the_walk_finds_the_node_components() -> None:
    names = {c.__name__ for c in COMPONENTS}
    assert {
        "Endpoint",
        "Connection",
        "RpcServer",
        "RpcClient",
        "ServerConnection",
        "AsyncStore",
        "Store",
        "DeliveryService",
        "AuditSink",
        "ChallengeBook",
        "Guard",
        "HttpServer",
    } <= names


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_statistics_returns_a_frozen_typed_snapshot(component: type) -> None:
    result = typing.get_type_hints(component.statistics)["return"]
    assert inspect.isclass(result), f"{component.__name__}.statistics() -> {result!r}"
    # Every record is a msgspec Struct: slotted by construction; frozen is a flag.
    assert issubclass(result, msgspec.Struct), f"{result.__name__}: not a record type"
    assert result.__struct_config__.frozen, f"{result.__name__} is not frozen"
    hints = typing.get_type_hints(result)
    fields = list(result.__struct_fields__)
    assert fields
    for name in fields:
        t = hints[name]
        assert t is not Any, f"{result.__name__}.{name} is untyped"
        origin = typing.get_origin(t) or t
        assert not (inspect.isclass(origin) and issubclass(origin, MUTABLE)), (
            f"{result.__name__}.{name}: {t!r} can change under the reader"
        )


# -- mypy over generated nodes --------------------------------------------------------


class _Gen:
    """Writes classes that implement a Protocol tree, optionally with one member renamed."""

    def __init__(self, prefix: str, rename: tuple[str, ...] | None) -> None:
        self.prefix = prefix
        self.rename = rename
        self.lines: list[str] = []
        self.names: dict[type, str] = {}

    def render(self, t: Any, path: tuple[str, ...]) -> str:
        if t is type(None):
            return "None"
        if t in (int, float, bool, str, bytes):
            return str(t.__name__)
        origin = typing.get_origin(t)
        if origin in (types.UnionType, typing.Union):
            return " | ".join(self.render(a, path) for a in typing.get_args(t))
        if origin is not None:
            args = ", ".join(self.render(a, path) for a in typing.get_args(t))
            return f"{origin.__module__}.{origin.__qualname__}[{args}]"
        if getattr(t, "_is_protocol", False):
            return self.implement(t, path)
        raise AssertionError(f"teach the generator about {t!r}")

    def implement(self, proto: type, path: tuple[str, ...]) -> str:
        name = f"{self.prefix}_{proto.__name__}_{len(self.lines)}"
        body: list[str] = []
        for member, value in vars(proto).items():
            if member.startswith("_"):
                continue
            shown = member + "_renamed" if (*path, member) == self.rename else member
            if isinstance(value, property):
                assert value.fget is not None
                t = typing.get_type_hints(value.fget)["return"]
                body.append(f"    {shown}: {self.render(t, (*path, member))}")
            elif inspect.isfunction(value):
                t = typing.get_type_hints(value)["return"]
                is_async = "async " if inspect.iscoroutinefunction(value) else ""
                ret = self.render(t, (*path, member))
                body.append(f"    {is_async}def {shown}(self) -> {ret}:")
                body.append("        raise NotImplementedError")
        self.lines += [f"class {name}:", *body, ""]
        return name


def leaves(proto: type, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every member path below NodeView whose type is not itself a Protocol."""
    out: list[tuple[str, ...]] = []
    for member, value in vars(proto).items():
        if member.startswith("_"):
            continue
        if isinstance(value, property):
            assert value.fget is not None
            t = typing.get_type_hints(value.fget)["return"]
        elif inspect.isfunction(value):
            t = typing.get_type_hints(value)["return"]
        else:
            continue
        protos = [a for a in (typing.get_args(t) or (t,)) if getattr(a, "_is_protocol", False)]
        if protos:
            for p in protos:
                out += leaves(p, (*path, member))
        else:
            out.append((*path, member))
    return out


TYPED_TEST = Path(__file__).with_name("test_metrics.py")
"""Checked with the generated code: ``make typecheck`` covers qpc_node only, and the
metrics tests' fakes must stay typed as what ``NodeMetrics`` reads."""


def test_renamed_statistics_field_fails_mypy(tmp_path: Path) -> None:
    drifts = leaves(metrics.NodeView)
    # Every source the collector reads is in the walk (not only serving()).
    sources = {p[0] for p in drifts}
    assert {"rpc", "endpoint", "store", "guard", "auth", "delivery", "audit"} <= sources
    lines = ["from __future__ import annotations", "import collections.abc"]
    lines += ["from qpc_node.ops.metrics import NodeMetrics", ""]
    checks: dict[int, tuple[str, ...] | None] = {}
    for i, rename in enumerate([None, *drifts]):
        gen = _Gen(f"V{i}", rename)
        node = gen.implement(metrics.NodeView, ())
        lines += gen.lines
        lines += [f"def check_{i}(node: {node}) -> None:"]
        checks[len(lines) + 1] = rename
        lines += ["    NodeMetrics(node, process=False)", "", ""]
    src = tmp_path / "drift.py"
    src.write_text("\n".join(lines))
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(src), str(TYPED_TEST)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(qpc_node.__file__).parent.parent,
    )
    errors = {
        int(m.group(1))
        for m in re.finditer(rf"{re.escape(src.name)}:(\d+): error: .*NodeView", r.stdout)
    }
    assert all(line in checks for line in errors), r.stdout
    missed = [".".join(p) for line, p in checks.items() if p is not None and line not in errors]
    assert not missed, f"renaming these does not fail mypy: {missed}\n{r.stdout}"
    control = next(line for line, p in checks.items() if p is None)
    assert control not in errors, r.stdout
    # Nothing else is wrong: not the generated code (the refusals are the drift only),
    # not test_metrics.py (its sources are typed as the real statistics types).
    assert r.stdout.count(": error: ") == len(errors) == len(drifts), r.stdout

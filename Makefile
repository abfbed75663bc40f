# Two commands matter (see README): `make run` and `make test`.
# Everything else here is what they are made of.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The cargo target dir lives outside the clone so fresh clones rebuild incrementally.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/qpc/cargo-target
STAMPS := .stamps
RUST_SRC := $(wildcard rust/src/*.rs rust/src/**/*.rs) rust/Cargo.toml $(wildcard rust/Cargo.lock)

.PHONY: package test-packaging package-cross test-cross
.PHONY: all venv build run test check lint typecheck clippy rust-test proto proto-check unit bench clean

all: build

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	@touch $@ $(STAMPS)/ext

venv: $(STAMPS)/venv

# Rebuild the Rust extension (into qpc_node/, editable) when its sources change.
$(STAMPS)/ext: $(STAMPS)/venv $(RUST_SRC)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $@

build: $(STAMPS)/ext

run: build
	$(VENV)/bin/qpc $(ARGS)

proto: venv
	PYTHON=$(abspath $(PY)) scripts/gen_proto.sh

proto-check: venv
	PYTHON=$(abspath $(PY)) scripts/check_proto.sh

lint: venv
	$(VENV)/bin/ruff check qpc_node qpc_sim tests bench
	$(VENV)/bin/ruff format --check qpc_node qpc_sim tests bench

typecheck: build
	$(VENV)/bin/mypy qpc_node qpc_sim

clippy:
	cd rust && cargo clippy --all-targets -- -D warnings

# Rust unit tests (rust/src/*: transactions, rollback on error/panic, log compaction, torn
# tail, wrong secret). cargo leaves pyo3/extension-module off (only maturin turns it on, see
# [tool.maturin] in pyproject.toml), so the test binary links; they need no interpreter.
rust-test:
	cd rust && cargo test --quiet

check: lint typecheck clippy rust-test proto-check

unit: build
	$(PY) -m pytest tests/unit -q

test: build check package
	$(PY) -m pytest -q

# Benchmarks run in their own venv so reference engines never become project deps.
BENCH_VENV ?= .venv-bench
$(STAMPS)/bench-venv: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip maturin agentvault-mls-rs-uniffi
	@touch $@

bench: $(STAMPS)/bench-venv $(STAMPS)/ext
	$(BENCH_VENV)/bin/pip install -q --no-build-isolation -e .
	$(BENCH_VENV)/bin/python bench/mls_bench.py

clean:
	rm -rf $(VENV) $(STAMPS) build dist qpc_node/_core*.so

# Self-contained qpc (bundled Python + C library, one-dir, nothing unpacked at start) and the
# OpenWrt .ipk for this machine's arch into dist/; fails past cross/budget.toml. Others:
# cross/build.sh aarch64|armv7 (docs/packaging.md).
package:
	cross/build.sh

test-packaging: package
	$(PY) -m pytest -q tests/packaging

# ARM builds: emulated (debootstrap + qemu-user, Rust cross-compiled), minutes each; not in CI.
# make test-cross CROSS_ARCH=armv7
CROSS_ARCH ?= aarch64
package-cross:
	cross/build.sh $(CROSS_ARCH)

test-cross: $(STAMPS)/venv package-cross
	PYTHON=$(PY) cross/test-arch.sh $(CROSS_ARCH) -q

#!/usr/bin/env bash
# cross/build.sh [ARCH] [--layout onedir|onefile|both] [--no-ipk]
#
# Builds the self-contained `qpc` for ARCH (default: this machine's arch) into dist/:
#   dist/root-ARCH/               staged install tree of the one-dir layout (the product):
#     usr/bin/qpc                 sh launcher: runs the bundle through the bundled loader
#     usr/lib/qpc/qpc             PyInstaller bootloader
#     usr/lib/qpc/_internal/      Python, extensions, their libraries AND the C library +
#                                 dynamic loader they were built against (libc-independent)
#   dist/qpc-ARCH.onefile         (--layout onefile|both) the spike's single ELF:
#                                 PyInstaller onefile + staticx; unpacks ~55 MiB to $TMPDIR per start
#   dist/qpc_VERSION_ARCH.ipk     OpenWrt package of the one-dir tree (packaging/openwrt/build-ipk.sh)
#   dist/size-ARCH.txt            size report; the x86_64 package is checked against cross/budget.toml
#
# ARCH: the machine's own arch natively with Debian's /usr/bin/python3.11 (no RUNPATH, shared
# libpython) in build/venv-ARCH. Another ARCH (aarch64 / armv7 on an x86_64 host) runs this
# same native build inside a debootstrapped Debian root under qemu-user: cross/guest.sh.
# Environment: QPC_SRC (project source, default: this checkout), CARGO_TARGET_DIR (reused),
# QPC_DIST (output, default dist/), QPC_WORK (work dir, default build/), QPC_WHEELS (a wheel
# directory to install from offline), QPC_PREBUILT_WHEELS (use these wheels, no maturin).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
src=${QPC_SRC:-$repo}
host_arch=$(uname -m)
case $host_arch in armv7*) host_arch=armv7 ;; esac  # qemu-arm and armhf boards say armv7l
arch=$host_arch
layout=onedir
make_ipk=1
ipk=
while [ $# -gt 0 ]; do
  case $1 in
    --layout) layout=$2; shift 2 ;;
    --no-ipk) make_ipk=0; shift ;;
    x86_64|aarch64|armv7) arch=$1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (ARCH is x86_64, aarch64 or armv7)" >&2; exit 2 ;;
  esac
done
case $layout in onedir|onefile|both) ;; *) echo "build.sh: --layout onedir|onefile|both" >&2; exit 2 ;; esac

dist=${QPC_DIST:-$repo/dist}
work=${QPC_WORK:-$repo/build}
mkdir -p "$dist" "$work"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/qpc/cargo-target}
t0=$(date +%s)
log() { echo "build.sh[$arch]: $*" >&2; }

if [ "$arch" != "$host_arch" ]; then
  # Foreign arch: the same build runs inside an emulated Debian root (cross/guest.sh).
  exec "$here/guest.sh" "$arch" "$layout" "$make_ipk"
fi

# ---------------------------------------------------------------- native build
PY=/usr/bin/python3.11
[ -x $PY ] || { log "needs Debian's python3.11 (apt install python3.11 python3.11-venv python3.11-dev)"; exit 1; }
venv=$work/venv-$arch
# QPC_PREBUILT_WHEELS: a directory with the project wheel and the cryptography wheel made
# elsewhere (cross/guest.sh cross-compiles both outside the emulator); then maturin is
# neither installed nor run here.
reqs=$work/requirements-build-$arch.txt
mkdir -p "$work"
if [ -n "${QPC_PREBUILT_WHEELS:-}" ]; then
  grep -v '^maturin==' "$here/requirements-build.txt" > "$reqs"
else
  cp "$here/requirements-build.txt" "$reqs"
fi
if [ ! -x "$venv/bin/pyinstaller" ] || ! cmp -s "$reqs" "$venv/.qpc-req"; then
  log "build venv $venv"
  rm -rf "$venv"
  $PY -m venv "$venv"
  "$venv/bin/pip" install -q ${QPC_WHEELS:+--no-index --find-links "$QPC_WHEELS"} -r "$reqs"
  cp "$reqs" "$venv/.qpc-req"
fi
wheels=$work/wheels-$arch
rm -rf "$wheels"
mkdir -p "$wheels"
crypto_pin=$(grep -E '^cryptography==' "$here/requirements-bundle.txt")
if [ -n "${QPC_PREBUILT_WHEELS:-}" ]; then
  cp "$QPC_PREBUILT_WHEELS"/*.whl "$wheels/"
else
  # The core for the bundle: one codegen unit, fat LTO, and every dependency at opt-level
  # "s" except the crates MLS messages and our record store spend their CPU in, and PyO3's
  # per-call glue, which stay at 3 (our own crate is not matched by "*" and stays at 3 too).
  # Core .so 3.83 -> 3.14 MiB, -0.20 MiB of the .ipk, MLS ops and node_bench unchanged
  # within this VM's noise (all of it at "s": -0.53 MiB but MLS encrypt/decrypt +30-75 %;
  # docs/packaging.md). Its own target dir (QPC_BUNDLE_CARGO_TARGET_DIR): another profile
  # would rebuild the development one.
  bundle_target=${QPC_BUNDLE_CARGO_TARGET_DIR:-$CARGO_TARGET_DIR-bundle}
  rust_cfg=(--config 'profile.release.package."*".opt-level="s"')
  for c in aes aes-gcm ghash polyval chacha20 poly1305 chacha20poly1305 sha2 curve25519-dalek \
    x25519-dalek ed25519-dalek p256 hmac hkdf serde_json hpke-rs-rust-crypto openmls_rust_crypto \
    pyo3 pyo3-ffi negentropy tls_codec; do
    rust_cfg+=(--config "profile.release.package.$c.opt-level=3")
  done
  log "build the wheel (maturin, abi3 extension; CARGO_TARGET_DIR=$bundle_target)"
  # `maturin build -o` rather than `pip install DIR`: pip's PEP 517 path puts the wheel in
  # $CARGO_TARGET_DIR/wheels, which a concurrent editable build of the checkout also uses.
  (cd "$src" && CARGO_TARGET_DIR=$bundle_target CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 CARGO_PROFILE_RELEASE_LTO=fat \
    "$venv/bin/maturin" build --quiet --release --interpreter "$venv/bin/python" --out "$wheels" "${rust_cfg[@]}" >&2)
  # cryptography against the system OpenSSL, the one the bundle carries anyway
  # (cross/requirements-bundle.txt says why); built once per version, then cached.
  # Its Rust module at opt-level "s", one codegen unit: -0.27 MiB of the .ipk (-0.9 MiB
  # installed); the primitives are OpenSSL's, and AES-GCM, Ed25519, X25519, SHA-256 and
  # certificate parsing showed no cost in interleaved runs (docs/performance.md).
  crypto_opt="CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1"
  cache=$work/cryptography-$arch-opt-s
  if ! ls "$cache/cryptography-${crypto_pin#cryptography==}-"*.whl >/dev/null 2>&1; then
    pkg-config --exists openssl 2>/dev/null || { log "needs OpenSSL headers: apt install libssl-dev pkg-config"; exit 1; }
    log "build $crypto_pin from source against the system OpenSSL (once, cached in $cache)"
    rm -rf "$cache"
    env $crypto_opt CARGO_TARGET_DIR=$work/cargo-cryptography "$venv/bin/pip" wheel -q --no-deps --no-binary cryptography \
      ${QPC_WHEELS:+--find-links "$QPC_WHEELS"} -w "$cache" "$crypto_pin"
  fi
  cp "$cache"/cryptography-*.whl "$wheels/"
fi
"$venv/bin/pip" install -q --force-reinstall --no-deps "$wheels"/*.whl
"$venv/bin/pip" install -q ${QPC_WHEELS:+--no-index --find-links "$QPC_WHEELS"} "$wheels"/quicprochat-*.whl
# zeroconf without its Cython modules: the same zeroconf from its sdist with SKIP_CYTHON=1
# (its build's own switch), pure Python. -1.0 MiB of the .ipk; the mDNS traffic of a router
# is a few packets a minute (docs/performance.md, "Package size", has the cost measured).
zc_version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("zeroconf"))')
zc_cache=$work/zeroconf-$arch
if ! ls "$zc_cache/zeroconf-$zc_version-"*.whl >/dev/null 2>&1; then
  log "build zeroconf $zc_version without Cython (once, cached in $zc_cache)"
  rm -rf "$zc_cache"
  SKIP_CYTHON=1 "$venv/bin/pip" wheel -q --no-deps --no-binary zeroconf \
    ${QPC_WHEELS:+--find-links "$QPC_WHEELS"} -w "$zc_cache" "zeroconf==$zc_version"
fi
"$venv/bin/pip" install -q --force-reinstall --no-deps "$zc_cache/zeroconf-$zc_version-"*.whl
"$venv/bin/python" - <<'PY' || { log "zeroconf still carries compiled modules"; exit 1; }
import pathlib, zeroconf
compiled = sorted(p.name for p in pathlib.Path(zeroconf.__file__).parent.rglob("*.so"))
assert not compiled, compiled
PY
# protobuf's upb module NEEDs libstdc++ but binds nothing of it (C code linked by the C++
# driver): drop the entry so the bundle carries no libstdc++ (-0.72 MiB of the .ipk, -2.1
# MiB installed; cross/drop_needed.py refuses when any symbol could come from it). Then
# load it with every symbol bound at once, as the proof. armv7 has no upb wheel: nothing to do.
upb=$("$venv/bin/python" - <<'PY'
import importlib.util as u
try:  # (find_spec of a dotted name imports its parent: armv7 has no google._upb at all)
    s = u.find_spec("google._upb._message")
except ModuleNotFoundError:
    s = None
print(s.origin if s else "")
PY
)
if [ -n "$upb" ]; then
  "$venv/bin/python" "$here/drop_needed.py" libstdc++.so.6 "$upb" >&2
  LD_BIND_NOW=1 "$venv/bin/python" -c 'from google.protobuf.internal import api_implementation as a; import google._upb._message; assert a.Type() == "upb", a.Type()' \
    || { log "protobuf's upb module does not load without libstdc++"; exit 1; }
fi
# Gate: one OpenSSL. Fails if pip swapped in PyPI's cryptography (its own OpenSSL) anyway.
"$venv/bin/python" - "$crypto_pin" <<'PY' || { log "cryptography is not the source build against the system OpenSSL"; exit 1; }
import importlib.metadata, ssl, sys
from cryptography.hazmat.backends.openssl import backend
pin = sys.argv[1].split("==")[1]
have = importlib.metadata.version("cryptography")
assert have == pin, f"cryptography {have}, expected {pin}"
assert backend.openssl_version_text() == ssl.OPENSSL_VERSION, (backend.openssl_version_text(), ssl.OPENSSL_VERSION)
PY
version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("quicprochat"))')
# Our own libsqlite3 in place of Debian's (cross/sqlite.sh says what differs): -0.16 MiB of
# the .ipk. Gate: Python's _sqlite3 loads it with every symbol bound at once, and it keeps
# the defaults the store and the client state were written against.
sqlite_so=$(PYTHON=$PY "$here/sqlite.sh" "$work")
LD_BIND_NOW=1 LD_LIBRARY_PATH=$(dirname "$sqlite_so") "$venv/bin/python" - <<'PY' || { log "our libsqlite3 does not serve Python's sqlite3"; exit 1; }
import sqlite3
db = sqlite3.connect(":memory:")
options = {row[0] for row in db.execute("PRAGMA compile_options")}
assert {"SECURE_DELETE", "THREADSAFE=1", "USE_URI", "OMIT_LOOKASIDE"} <= options, options
assert db.execute("PRAGMA secure_delete").fetchone() == (1,)
assert sqlite3.threadsafety == 3, sqlite3.threadsafety  # serialized, as Debian's
PY

freeze() {  # freeze LAYOUT -> build/pyi-ARCH/dist-LAYOUT
  local pyi=$work/pyi-$arch
  log "PyInstaller $1"
  # PYZ modules at zlib level 9 (PyInstaller's default for the PYZ is 6; the same inflate
  # at start, so no run-time cost). PYTHONNODEBUGRANGES: PyInstaller compiles every module
  # in its own process, so the frozen code objects carry no PEP 657 column tables, which the
  # bootloader's -X no_debug_ranges (cross/qpc.spec) dropped at load time anyway.
  PYTHONNODEBUGRANGES=1 PYINSTALLER_ZLIB_COMPRESSION_LEVEL=9 QPC_LAYOUT=$1 QPC_CROSS=$here "$venv/bin/pyinstaller" --noconfirm --clean --log-level WARN \
    --distpath "$pyi/dist-$1" --workpath "$pyi/work-$1" "$here/qpc.spec"
}

if [ "$layout" != onefile ]; then
  freeze onedir
  root=$dist/root-$arch
  rm -rf "$root"
  mkdir -p "$root/usr/bin" "$root/usr/lib"
  cp -a "$work/pyi-$arch/dist-onedir/qpc" "$root/usr/lib/qpc"
  [ -f "$root/usr/lib/qpc/_internal/libsqlite3.so.0" ] || { log "PyInstaller collected no libsqlite3.so.0 to replace"; exit 1; }
  cp "$sqlite_so" "$root/usr/lib/qpc/_internal/libsqlite3.so.0"
  # The C library and loader the bundle was linked against, next to the other libraries
  # (PyInstaller re-executes itself once with LD_LIBRARY_PATH=_internal, so they must be there).
  loader=$("$venv/bin/python" "$here/bundle_libc.py" "$root/usr/lib/qpc")
  sed "s|@LOADER@|$loader|" "$here/launcher.sh.in" > "$root/usr/bin/qpc"
  chmod 0755 "$root/usr/bin/qpc"
  "$root/usr/bin/qpc" version >/dev/null || { log "bundle does not start"; exit 1; }
  if [ "$make_ipk" = 1 ]; then
    # data.tar.gz with libdeflate's level 12 instead of gzip -9: -0.42 MiB of the .ipk in the
    # same ~6 s (zopfli saves 0.50 MiB in 8+ minutes); the same deflate format, so opkg and
    # busybox gunzip read it as before.
    command -v libdeflate-gzip >/dev/null || { log "needs libdeflate-gzip: apt install libdeflate-tools"; exit 1; }
    ipk=$(IPK_GZIP="libdeflate-gzip -12 -c" "$repo/packaging/openwrt/build-ipk.sh" "$root" "$arch" "$version" "$dist")
  fi
  # the same tree as a tarball, for the OpenWrt feed Makefile (packaging/openwrt/Makefile)
  tar --format=gnu --numeric-owner --owner=0 --group=0 -C "$root" -czf "$dist/qpc-bundle-$version-$arch.tar.gz" usr
fi
if [ "$layout" != onedir ]; then
  freeze onefile
  log "staticx"
  "$venv/bin/staticx" --strip "$work/pyi-$arch/dist-onefile/qpc" "$dist/qpc-$arch.onefile"
fi

"$venv/bin/python" "$here/size_report.py" --dist "$dist" --arch "$arch" --version "$version" ${ipk:+--ipk "$ipk"} \
  --budget "$here/budget.toml" --seconds $(( $(date +%s) - t0 ))

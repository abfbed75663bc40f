#!/usr/bin/env bash
# cross/guest.sh ARCH LAYOUT MAKE_IPK   (run by cross/build.sh for ARCH aarch64 | armv7)
#
# The x86_64 build, emulated: cross/build.sh runs natively inside a debootstrapped Debian
# bookworm root of ARCH under qemu-user (binfmt_misc), so the bundle carries bookworm's
# python3.11 and the glibc + loader of that root exactly as the x86_64 bundle does.
#
# Only the Rust extension is built outside the emulator. OpenMLS 0.9.2 needs rustc >= 1.91;
# the only Rust for arm reachable here is Debian's (rustup's servers are not), and the one
# new enough is in Debian forky (testing): an x86_64 forky root, the "rustbox", holds
# rustc + cargo, the arm64/armhf standard libraries and the cross gccs, and cross-compiles
# the abi3 extension — and cryptography, against the guest's OpenSSL — with the ARCH guest
# root as sysroot, so both link against the glibc (2.36) and libssl they will run with. That is minutes natively instead of most of an hour
# of rustc under qemu.
#
# Roots are cached under $QPC_CROSS_CACHE (default ~/.cache/qpc/cross) and rebuilt when
# their recipe (this file's stamps) changes. Every mount made here and every binfmt entry
# enabled here is undone on exit. Needs root. Output: the same files as a native build,
# copied to $QPC_DIST (default dist/), plus the emulated-build timings in size-ARCH.txt.
# Environment: QPC_SRC (source, default this checkout), QPC_CROSS_CACHE, QPC_DIST,
# QPC_DEBIAN_MIRROR (default http://deb.debian.org/debian), QPC_WHEELS (install the Python
# dependencies offline from this host directory instead of PyPI).
set -euo pipefail

arch=${1:?ARCH} layout=${2:-onedir} make_ipk=${3:-1}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
src=${QPC_SRC:-$repo}
dist=${QPC_DIST:-$repo/dist}
cache=${QPC_CROSS_CACHE:-$HOME/.cache/qpc/cross}
mirror=${QPC_DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "guest.sh[$arch]: $*" >&2; }
die() { log "$*"; exit 1; }

case $arch in
  aarch64) deb=arm64 qemu=aarch64 target=aarch64-unknown-linux-gnu cc=aarch64-linux-gnu ;;
  armv7) deb=armhf qemu=arm target=armv7-unknown-linux-gnueabihf cc=arm-linux-gnueabihf ;;
  *) die "ARCH must be aarch64 or armv7" ;;
esac
[ "$layout" = onedir ] || die "only --layout onedir is built for $arch (staticx, for the onefile comparison, ships x86_64 wheels only)"
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount, binfmt_misc)"

guest=$cache/guest-$arch
rustbox=$cache/rustbox
# Recipes: change a list and the root is rebuilt on the next run.
GUEST_SUITE=bookworm
GUEST_PKGS="python3.11 python3.11-venv python3.11-dev libpython3.11 binutils gcc libc6-dev
  libffi-dev libssl-dev zlib1g-dev ca-certificates busybox-static libdeflate-tools"
RUSTBOX_SUITE=forky
RUSTBOX_PKGS="rustc cargo libstd-rust-dev:arm64 libstd-rust-dev:armhf gcc-aarch64-linux-gnu
  gcc-arm-linux-gnueabihf libc6-dev python3-venv ca-certificates"
GUEST_PKGS=$(printf '%s' "$GUEST_PKGS" | tr -s ' \n' '  ')  # one line: they go into sh -c
RUSTBOX_PKGS=$(printf '%s' "$RUSTBOX_PKGS" | tr -s ' \n' '  ')
maturin_pin=$(grep -E '^maturin==' "$here/requirements-build.txt" | head -1)
[ -n "$maturin_pin" ] || die "no maturin== pin in cross/requirements-build.txt"
crypto_pin=$(grep -E '^cryptography==' "$here/requirements-bundle.txt" | head -1)
[ -n "$crypto_pin" ] || die "no cryptography== pin in cross/requirements-bundle.txt"
guest_stamp="v1 $GUEST_SUITE $deb $GUEST_PKGS"
rustbox_stamp="v3 $RUSTBOX_SUITE $RUSTBOX_PKGS $maturin_pin cffi setuptools"

# shellcheck source=cross/binfmt.sh
. "$here/binfmt.sh"

# ---------------------------------------------------------------- undo on exit
mounts=()
unmount_since() {  # unmount_since N: undo the mounts made after the first N, newest first
  local i
  for ((i = ${#mounts[@]} - 1; i >= $1; i--)); do
    umount "${mounts[i]}" 2>/dev/null || umount -l "${mounts[i]}" 2>/dev/null || log "could not unmount ${mounts[i]}"
    unset 'mounts[i]'
  done
}
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  unmount_since 0
  binfmt_undo
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mnt() {  # mnt ARGS... TARGET: mount and remember to unmount
  mount "$@"
  mounts+=("${*: -1}")
}

# chroot with a clean environment: the host's trust store (which may hold a proxy's CA) is
# copied in and named explicitly for pip, cargo and curl.
enter() {
  local root=$1; shift
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/qpc-host-ca.pem"
  cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
    SSL_CERT_FILE=/etc/qpc-host-ca.pem PIP_CERT=/etc/qpc-host-ca.pem \
    CARGO_HTTP_CAINFO=/etc/qpc-host-ca.pem PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 DEBIAN_FRONTEND=noninteractive "$@"
}
with_proc() {  # with_proc ROOT: /proc for the rest of this run
  mountpoint -q "$1/proc" || mnt -t proc proc "$1/proc"
}

# ---------------------------------------------------------------- host tools + binfmt
need_host_tools() {
  command -v debootstrap >/dev/null || { log "apt-get install debootstrap"; apt-get install -y -qq debootstrap >/dev/null; }
  binfmt_on "$qemu"
}

# ---------------------------------------------------------------- roots
# rm -rf of a root, refusing while anything is mounted below it (a bind mount of the cargo
# registry or of the source must never be deleted through a chroot).
remove_root() {
  if awk -v r="$1/" 'index($2 "/", r) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
    die "$1 still has mounts below it (an interrupted run?): umount them first (grep '$1' /proc/mounts)"
  fi
  rm -rf "$1"
}
fresh() { [ "$(cat "$1/.qpc-stamp" 2>/dev/null)" = "$2" ]; }

make_guest() {
  fresh "$guest" "$guest_stamp" && return
  log "debootstrap $GUEST_SUITE $deb into $guest (emulated second stage: minutes)"
  remove_root "$guest"
  debootstrap --foreign --arch="$deb" --variant=minbase "$GUEST_SUITE" "$guest" "$mirror" >/dev/null
  chroot "$guest" /debootstrap/debootstrap --second-stage >/dev/null
  with_proc "$guest"
  # shellcheck disable=SC2086
  enter "$guest" sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $GUEST_PKGS >/dev/null"
  enter "$guest" apt-get clean
  echo "$guest_stamp" > "$guest/.qpc-stamp"
}

make_rustbox() {
  fresh "$rustbox" "$rustbox_stamp" && return
  log "debootstrap $RUSTBOX_SUITE amd64 into $rustbox (rustc for arm + cross gcc)"
  remove_root "$rustbox"
  # bookworm's debootstrap has no script named after forky: testing uses sid's
  debootstrap --variant=minbase --include=ca-certificates "$RUSTBOX_SUITE" "$rustbox" "$mirror" \
    /usr/share/debootstrap/scripts/sid >/dev/null
  with_proc "$rustbox"
  # Signatures are checked as always, but not the Release file's Valid-Until: mirrors that
  # serve testing as a snapshot (as this workplace's does, 2026-11) let it lapse, and the
  # rustbox is a build tool whose output the packaging tests check, not something shipped.
  echo 'Acquire::Check-Valid-Until "false";' > "$rustbox/etc/apt/apt.conf.d/99qpc-snapshot"
  # shellcheck disable=SC2086
  enter "$rustbox" sh -c "dpkg --add-architecture arm64 && dpkg --add-architecture armhf \
    && apt-get update -qq && apt-get install -y -qq --no-install-recommends $RUSTBOX_PKGS >/dev/null \
    && apt-get clean && python3 -m venv /opt/venv && /opt/venv/bin/pip install -q '$maturin_pin' cffi setuptools"
  echo "$rustbox_stamp" > "$rustbox/.qpc-stamp"
}

# The working tree as git sees it (tracked + untracked, minus ignored: no .venv, build/,
# in-tree x86_64 extension), into DEST.
export_source() {
  local dest=$1
  rm -rf "$dest"; mkdir -p "$dest"
  if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$src" ls-files -z -co --exclude-standard |
      while IFS= read -r -d '' f; do [ -e "$src/$f" ] && printf '%s\0' "$f"; done |
      tar -C "$src" --null -T - -cf - | tar -C "$dest" -xf -
  else
    tar -C "$src" --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.so' -cf - . |
      tar -C "$dest" -xf -
  fi
}

# ---------------------------------------------------------------- build
# One function, called on the last line: bash has read the whole file before it runs, so
# editing or checking out this script during a (long) build cannot change the running one.
main() {
  t0=$(date +%s)
  need_host_tools
  make_guest
  t_guest=$(date +%s)
  export_source "$guest/qpc/src"
  rm -rf "$guest/qpc/wheel" "$guest/qpc/dist"
  mkdir -p "$guest/qpc/wheel" "$guest/qpc/dist" "$cache/cargo-target" "$HOME/.cargo/registry"

  # The rustbox is shared by the arches: one build at a time uses it (flock), under per-arch
  # mount points, and its mounts are gone again before the emulated part starts.
  exec 9>"$cache/rustbox.lock"
  flock 9
  mark=${#mounts[@]}
  make_rustbox
  t_rustbox=$(date +%s)
  log "cross-compile the Rust extension for $target in the rustbox"
  in=/qpc-$arch
  mkdir -p "$rustbox$in/src" "$rustbox$in/sysroot" "$rustbox$in/out" "$rustbox/root/target" \
    "$rustbox/root/.cargo/registry"
  with_proc "$rustbox"
  mnt --bind "$guest/qpc/src" "$rustbox$in/src"
  mount -o remount,bind,ro "$rustbox$in/src"
  mnt --bind "$guest" "$rustbox$in/sysroot"
  mount -o remount,bind,ro "$rustbox$in/sysroot"
  mnt --bind "$guest/qpc/wheel" "$rustbox$in/out"
  mnt --bind "$cache/cargo-target" "$rustbox/root/target"
  mnt --bind "$HOME/.cargo/registry" "$rustbox/root/.cargo/registry"
  T=$(echo "$target" | tr 'a-z-' 'A-Z_')
  enter "$rustbox" env CARGO_TARGET_DIR=/root/target \
    "CARGO_TARGET_${T}_LINKER=$cc-gcc" \
    "CARGO_TARGET_${T}_RUSTFLAGS=-C link-arg=--sysroot=$in/sysroot" \
    sh -c "cd $in/src && maturin build --quiet --release --locked --target $target --compatibility linux --out $in/out" >&2
  # cryptography from its sdist against the guest's OpenSSL (cross/requirements-bundle.txt):
  # openssl-sys and cc find the arm libssl/headers in the sysroot, cryptography's cffi part
  # takes the guest's python3.11 headers through PYO3_CROSS_LIB_DIR.
  log "cross-compile $crypto_pin against the guest's OpenSSL"
  enter "$rustbox" env CARGO_TARGET_DIR=/root/target/cryptography \
    "CARGO_TARGET_${T}_LINKER=$cc-gcc" \
    "CARGO_TARGET_${T}_RUSTFLAGS=-C link-arg=--sysroot=$in/sysroot" \
    "CC_${target//-/_}=$cc-gcc" "CFLAGS_${target//-/_}=--sysroot=$in/sysroot" \
    "${T}_OPENSSL_LIB_DIR=$in/sysroot/usr/lib/$cc" "${T}_OPENSSL_INCLUDE_DIR=$in/sysroot/usr/include" \
    PYO3_CROSS_LIB_DIR="$in/sysroot/usr/lib/python3.11" PYO3_PYTHON=/opt/venv/bin/python3 \
    sh -c "rm -rf $in/crypto && mkdir -p $in/crypto && cd $in/crypto \
      && pip download -q --no-binary cryptography --no-deps '$crypto_pin' -d . \
      && tar xzf cryptography-*.tar.gz && cd cryptography-*/ \
      && maturin build --quiet --release --target $target --compatibility linux --out $in/out" >&2
  unmount_since "$mark"
  flock -u 9
  t_rust=$(date +%s)
  ls "$guest/qpc/wheel"/quicprochat-*.whl "$guest/qpc/wheel"/cryptography-*.whl >/dev/null ||
    die "the rustbox made no project or cryptography wheel"

  with_proc "$guest"
  log "native build inside the emulated $GUEST_SUITE $deb root"
  ipk_flag=; [ "$make_ipk" = 1 ] || ipk_flag=--no-ipk
  # QPC_WHEELS: a wheel directory prepared on the host (e.g. `pip download --platform ...`),
  # for a guest that cannot reach PyPI; pip inside then installs offline from it.
  local offline=()
  rm -rf "$guest/qpc/wheels"
  if [ -n "${QPC_WHEELS:-}" ]; then
    cp -a "$QPC_WHEELS" "$guest/qpc/wheels"
    offline=(QPC_WHEELS=/qpc/wheels)
  fi
  enter "$guest" env "${offline[@]}" QPC_PREBUILT_WHEELS=/qpc/wheel QPC_DIST=/qpc/dist QPC_WORK=/qpc/work \
    /qpc/src/cross/build.sh "$arch" --layout onedir $ipk_flag
  t_build=$(date +%s)

  mkdir -p "$dist"
  rm -rf "$dist/root-$arch"
  cp -a "$guest/qpc/dist/." "$dist/"
  {
    echo "emulated build: $((t_build - t0)) s in all = guest root $((t_guest - t0)) s" \
      "+ rustbox $((t_rustbox - t_guest)) s + Rust cross-compile $((t_rust - t_rustbox)) s" \
      "+ build under qemu-$qemu $((t_build - t_rust)) s (roots are cached in $cache)"
  } | tee -a "$dist/size-$arch.txt" >&2
}

main
exit

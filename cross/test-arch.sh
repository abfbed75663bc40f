#!/usr/bin/env bash
# cross/test-arch.sh ARCH [PYTEST ARGS...]
#
# The packaging tests (tests/packaging) against a cross build of ARCH (aarch64 | armv7):
# dist/root-ARCH and its .ipk from `cross/build.sh ARCH`. The busybox-only roots hold that
# arch's static busybox (from the build's guest root) and the ARCH bundle; binfmt_misc runs
# both under qemu-user, so no x86_64 code is inside a root. Health calls and the procd/ipk
# checks run on the host. Emulation is slower, so figures from here are not hardware figures.
# Needs root; binfmt is enabled for the run and put back as it was afterwards.
set -euo pipefail
arch=${1:?usage: cross/test-arch.sh aarch64|armv7 [pytest args]}; shift
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
case $arch in
  aarch64) qemu=aarch64 ;;
  armv7) qemu=arm ;;
  *) echo "test-arch.sh: ARCH is aarch64 or armv7" >&2; exit 2 ;;
esac
cache=${QPC_CROSS_CACHE:-$HOME/.cache/qpc/cross}
busybox=${QPC_BUSYBOX:-$cache/guest-$arch/bin/busybox}
dist=${QPC_DIST:-$repo/dist}
[ -x "$dist/root-$arch/usr/bin/qpc" ] || { echo "test-arch.sh: no $dist/root-$arch: run cross/build.sh $arch" >&2; exit 1; }
[ -x "$busybox" ] || { echo "test-arch.sh: no busybox for $arch at $busybox (cross/build.sh $arch makes one)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "test-arch.sh: needs root" >&2; exit 1; }

# shellcheck source=cross/binfmt.sh
. "$here/binfmt.sh"
trap binfmt_undo EXIT
binfmt_on "$qemu"
cd "$repo"
QPC_TEST_ARCH=$arch QPC_BUSYBOX=$busybox QPC_DIST=$dist \
  "${PYTHON:-$repo/.venv/bin/python}" -m pytest -p no:cacheprovider tests/packaging "$@"

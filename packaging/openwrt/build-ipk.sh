#!/bin/sh
# build-ipk.sh BIN ARCH VERSION OUTDIR  ->  prints OUTDIR/qpc_VERSION_OPKGARCH.ipk
#
# BIN   a staged install tree (cross/build.sh's dist/root-ARCH: usr/bin/qpc + usr/lib/qpc/),
#       or a single self-contained binary (the onefile variant), installed as /usr/bin/qpc
# ARCH  x86_64 | aarch64 | armv7 (mapped to OpenWrt's names: x86_64, aarch64_generic,
#       arm_cortex-a7_neon-vfpv4) or any OpenWrt architecture name, used verbatim
#       (`opkg print-architecture` on the router lists the ones it accepts)
#
# The package is what OpenWrt's scripts/ipkg-build makes, without the SDK: a gzipped
# GNU tar of ./debian-binary ./data.tar.gz ./control.tar.gz, files owned by root.
# SOURCE_DATE_EPOCH makes it reproducible. IPK_GZIP: the command that compresses
# data.tar.gz from stdin to stdout (default gzip -9n; cross/build.sh passes libdeflate's
# level 12: the same deflate stream any gunzip, opkg's included, reads, 0.4 MiB smaller).
set -eu
[ $# -eq 4 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
bin=$1 arch=$2 version=$3
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$4"; out=$(cd "$4" && pwd)
case $arch in
	x86_64) opkg_arch=x86_64 ;;
	aarch64) opkg_arch=aarch64_generic ;;
	armv7) opkg_arch=arm_cortex-a7_neon-vfpv4 ;;
	*) opkg_arch=$arch ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/qpc-ipk.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
root=$work/data
mkdir -p "$root" "$work/control"
if [ -d "$bin" ]; then
	[ -x "$bin/usr/bin/qpc" ] || { echo "build-ipk.sh: $bin has no usr/bin/qpc" >&2; exit 1; }
	cp -a "$bin/." "$root/"
else
	install -D -m 0755 "$bin" "$root/usr/bin/qpc"
fi
cp -a "$here/files/." "$root/"
chmod 0755 "$root/etc/init.d/qpc"
chmod 0644 "$root/etc/config/qpc" "$root/lib/upgrade/keep.d/qpc"

TS=@${SOURCE_DATE_EPOCH:-$(date +%s)}
tarc() { tar --format=gnu --numeric-owner --owner=0 --group=0 --sort=name --mtime="$TS" "$@"; }
# shellcheck disable=SC2086 # IPK_GZIP is a command with its options
(cd "$root" && tarc -cf - .) | ${IPK_GZIP:-gzip -9n} > "$work/data.tar.gz"
size=$(find "$root" -type f -exec stat -c %s {} + | awk '{s+=$1} END {print s+0}')
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$opkg_arch/" -e "s/@SIZE@/$size/" \
	"$here/control/control.in" > "$work/control/control"
install -m 0644 "$here/control/conffiles" "$work/control/conffiles"
install -m 0755 "$here/control/postinst" "$here/control/prerm" "$work/control/"
(cd "$work/control" && tarc -cf - .) | gzip -9n > "$work/control.tar.gz"
echo "2.0" > "$work/debian-binary"
ipk=$out/qpc_${version}_${opkg_arch}.ipk
(cd "$work" && tarc -cf - ./debian-binary ./data.tar.gz ./control.tar.gz) | gzip -n > "$ipk"
echo "$ipk"

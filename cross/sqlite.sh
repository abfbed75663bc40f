#!/usr/bin/env bash
# cross/sqlite.sh WORKDIR   (run by cross/build.sh, natively or inside the emulated root)
#
# Builds the libsqlite3.so.0 the bundle carries instead of Debian's, and prints its path.
#
# Debian's library carries FTS3/4/5, R*Tree, Geopoly, sessions, JSON, the dbstat and stmt
# virtual tables: 1.44 MiB, 0.66 MiB of the .ipk. qpc uses none of them. This one is
# SQLite's own amalgamation with Debian's defaults that change behaviour kept (secure_delete
# on by default, URI file names, LIKE not matching BLOBs, the variable and schema-retry limits,
# no lookaside, math functions) and the extensions left out: -0.16 MiB of the .ipk
# (docs/packaging.md has the measurements). It exports every function Python's _sqlite3
# module binds (cross/build.sh checks that with LD_BIND_NOW before it is used).
#
# Source: the amalgamation in the libsqlite3-sys crate on crates.io (the machine reaches
# crates.io; sqlite.org is not reachable here), pinned by version and SHA-256. A security
# release of SQLite is a new crate version: change the three lines below. Built once per
# pin, flags and arch, then cached in WORKDIR. QPC_SQLITE_CRATE: a local copy of the .crate;
# PYTHON: the interpreter that downloads it (default python3); CC: the compiler (default cc).
set -euo pipefail

work=${1:?WORKDIR}
crate=libsqlite3-sys-0.40.0
crate_sha256=b06e69070b7e12262b0cd90832f0a7396f142a2b330181255562decf9f0c6215
sqlite_version=3.54.1
# Debian bookworm's libsqlite3 build options that change what SQL does, then the size ones.
defines="-DSQLITE_THREADSAFE=1 -DSQLITE_SECURE_DELETE -DSQLITE_USE_URI=1
  -DSQLITE_LIKE_DOESNT_MATCH_BLOBS -DSQLITE_MAX_VARIABLE_NUMBER=250000
  -DSQLITE_MAX_SCHEMA_RETRY=25 -DSQLITE_OMIT_LOOKASIDE -DSQLITE_ENABLE_MATH_FUNCTIONS
  -DSQLITE_OMIT_JSON -DSQLITE_OMIT_DEPRECATED -DSQLITE_DEFAULT_MEMSTATUS=0"
# Debian's hardening flags (dpkg-buildflags on bookworm) and its -O2.
cflags="-O2 -fPIC -fstack-protector-strong -Wformat -Werror=format-security -D_FORTIFY_SOURCE=2"
ldflags="-shared -Wl,-soname,libsqlite3.so.0 -Wl,-z,relro"

key=$(printf '%s\n' "$crate" "$crate_sha256" "$defines" "$cflags" "$ldflags" | sha256sum | cut -c1-12)
out=$work/sqlite-$(uname -m)-$sqlite_version-$key
so=$out/libsqlite3.so.0
if [ -f "$so" ]; then
  echo "$so"
  exit 0
fi

log() { echo "sqlite.sh: $*" >&2; }
mkdir -p "$work"
file=${QPC_SQLITE_CRATE:-$work/$crate.crate}
if [ ! -f "$file" ]; then
  log "download $crate from crates.io"
  "${PYTHON:-python3}" - "$file" "https://static.crates.io/crates/${crate%-*}/$crate.crate" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[2], timeout=120) as r, open(sys.argv[1] + ".part", "wb") as f:
    f.write(r.read())
PY
  mv "$file.part" "$file"
fi
echo "$crate_sha256  $file" | sha256sum -c --quiet - >&2 || { log "$file: SHA-256 differs from the pin"; exit 1; }

rm -rf "$out.tmp"
mkdir -p "$out.tmp"
tar -xzf "$file" -C "$out.tmp" --strip-components=2 "$crate/sqlite3/sqlite3.c" "$crate/sqlite3/sqlite3.h"
grep -q "define SQLITE_VERSION *\"$sqlite_version\"" "$out.tmp/sqlite3.h" ||
  { log "$crate does not carry SQLite $sqlite_version"; exit 1; }
log "compile SQLite $sqlite_version (once per pin and flags, cached in $out)"
# shellcheck disable=SC2086  # the flag lists are word lists
${CC:-cc} $cflags $defines $ldflags -o "$out.tmp/libsqlite3.so.0" "$out.tmp/sqlite3.c" -lm
strip --strip-unneeded "$out.tmp/libsqlite3.so.0"
rm -f "$out.tmp/sqlite3.c"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$so"

#!/usr/bin/env bash
# Fails when the committed generated modules differ from what the schema gives.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$here/scripts/gen_proto.sh" "$tmp/gen"
if ! diff -r -x __pycache__ "$tmp/gen" "$here/qpc_node/wire/gen"; then
  echo "generated protobuf modules are stale: run 'make proto' and commit" >&2
  exit 1
fi
echo "proto: generated modules match the schema"

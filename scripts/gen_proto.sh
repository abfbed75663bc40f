#!/usr/bin/env bash
# Generate Python modules (and .pyi stubs) from proto/ into OUT (default
# qpc_node/wire/gen). Reproducible: the protoc inside the pinned grpcio-tools
# does the work, and imports are rewritten to our package path.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/qpc_node/wire/gen}
py=${PYTHON:-python3}
rm -rf "$out"
mkdir -p "$out"
cd "$here/proto"
"$py" -m grpc_tools.protoc -I. --python_out="$out" --pyi_out="$out" qpc/v1/*.proto
find "$out" -type d -exec touch {}/__init__.py \;
# protoc emits "from qpc.v1 import x_pb2"; our modules live under qpc_node.wire.gen.
find "$out" -name '*.py' -o -name '*.pyi' | while read -r f; do
  sed -i 's/^from qpc\.v1 import/from qpc_node.wire.gen.qpc.v1 import/' "$f"
done

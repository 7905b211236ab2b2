#!/usr/bin/env bash
# Regenerate the Python gRPC stubs of proto/weightsmith/v1/*.proto into service/_proto/.
#
#   scripts/gen_proto.sh            # regenerate in place (commit the result)
#   scripts/gen_proto.sh OUT_DIR    # write to OUT_DIR instead (the drift test diffs it)
#
# Works offline: grpcio-tools bundles protoc and the well-known types. protoc derives imports
# from the .proto paths ("from weightsmith.v1 import job_pb2"); they are rewritten so that the
# stubs import as the package service._proto.weightsmith.v1, while the descriptor file names stay
# "weightsmith/v1/*.proto" (what reflection clients and buf expect).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/service/_proto}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
# the stubs are pinned to their generator: the grpcio-tools of requirements/dev.lock (make install)
want=$(sed -n 's/^grpcio-tools==//p' "$ROOT/requirements/dev.lock")
have=$("$PY" -c 'from importlib.metadata import version; print(version("grpcio-tools"))' 2>/dev/null || echo none)
if [ "$want" != "$have" ]; then
  echo "gen_proto.sh: $PY has grpcio-tools $have, the lock pins $want (run make install)" >&2
  exit 2
fi
mkdir -p "$OUT"
rm -rf "$OUT/weightsmith"
cd "$ROOT/proto"
"$PY" -m grpc_tools.protoc -I. \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  weightsmith/v1/job.proto weightsmith/v1/merge_service.proto weightsmith/v1/checkpoint_service.proto \
  weightsmith/v1/job_service.proto weightsmith/v1/alignment_service.proto weightsmith/v1/soup_service.proto \
  weightsmith/v1/metanet_service.proto weightsmith/v1/lineage_service.proto weightsmith/v1/evolve_service.proto
# absolute imports -> package imports
find "$OUT/weightsmith" -name '*.py' -o -name '*.pyi' | sort | while read -r f; do
  sed -i -E 's/^from weightsmith\.v1 import /from service._proto.weightsmith.v1 import /' "$f"
done
printf '"""Generated gRPC stubs (scripts/gen_proto.sh); do not edit."""\n' > "$OUT/__init__.py"
: > "$OUT/weightsmith/__init__.py"
: > "$OUT/weightsmith/v1/__init__.py"

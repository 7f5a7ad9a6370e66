#!/usr/bin/env bash
# The main job: the full smart-biopsy demo on the embedded phantom case. Output folder: $1 (default out/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
OUT="${1:-out/demo}"
exec .venv/bin/smartbiopsy demo --out "$OUT"

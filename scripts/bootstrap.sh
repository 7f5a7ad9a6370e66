#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv) with everything SmartBiopsy needs headless.
# Idempotent: re-installs only when pyproject.toml changed. Needs Python >= 3.11 and the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "SmartBiopsy needs Python >= 3.11 (found " + sys.version.split()[0] + ")")'
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.smartbiopsy-installed
WANT="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "installing SmartBiopsy and its dependencies into .venv ..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # pyradiomics (the radiomics extra, version bound in pyproject.toml) builds a C extension against the
  # installed numpy and needs its build tools first, without build isolation
  .venv/bin/python -m pip install -q numpy setuptools wheel versioneer
  .venv/bin/python -m pip install -q --no-build-isolation -e ".[dev,radiomics,export]"
  echo "$WANT" > "$STAMP"
fi

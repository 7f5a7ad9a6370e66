#!/usr/bin/env bash
# The core and MRML suites again, with the Python packages desktop 3D Slicer 5.10 bundles (the oldest Slicer
# SmartBiopsy supports): Python 3.12, numpy 2.0.2, scipy 1.13.1, pydicom 2.4.4, SimpleITK 2.5.2, and neither
# matplotlib nor pyradiomics (Slicer installs the first on first use, the SlicerRadiomics extension brings the
# second), so the tests that need them check the fail-soft path here. The MRML stand-in is the oldest
# slicer-core on the package registry (its vtk installed without vtk's matplotlib dependency, as Slicer's own
# VTK has none). Own virtual environment .venv-slicer/, rebuilt only when the pinned set below changes.
# Extra arguments go to pytest (test paths default to Testing/core Testing/mrml).
set -euo pipefail
cd "$(dirname "$0")/.."

# The pinned set: what Slicer 5.10's SuperBuild ships (keep in step with SLICER_MINIMUM in CMakeLists.txt).
SLICER_VERSION=5.10
SLICER_PYTHON=3.12
SLICER_PACKAGES="numpy==2.0.2 scipy==1.13.1 pydicom==2.4.4 SimpleITK==2.5.2"
MRML_STAND_IN="slicer-core==5.11.0.2 vtk==9.6.0"
TEST_TOOLS="pytest>=8 pytest-timeout>=2.2"
ABSENT="matplotlib radiomics"  # must not import in this environment
VENV=.venv-slicer

# Python 3.12 as in Slicer 5.10: SLICER_ENV_PYTHON, python3.12 on PATH or a pyenv 3.12; else this Python (said).
PY=""
for cand in "${SLICER_ENV_PYTHON:-}" python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
  [ -n "$cand" ] || continue
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    PY="$cand"
    break
  fi
done
if [ -z "$PY" ]; then
  PY="${PYTHON:-python3}"
  echo "note: no Python $SLICER_PYTHON found (Slicer $SLICER_VERSION bundles $SLICER_PYTHON); the Slicer-package tests run on $("$PY" -c 'import platform; print(platform.python_version())')" >&2
fi

STAMP="$VENV/.slicer-env"
WANT="$("$PY" -c 'import platform; print(platform.python_version())') $SLICER_PACKAGES $MRML_STAND_IN $TEST_TOOLS"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "building $VENV: Slicer $SLICER_VERSION packages ($SLICER_PACKAGES) on Python $("$PY" -c 'import platform; print(platform.python_version())') ..." >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check $SLICER_PACKAGES $TEST_TOOLS
  # vtk's wheel declares matplotlib as a dependency; Slicer's VTK does not, so neither does this environment
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps $MRML_STAND_IN
  echo "$WANT" > "$STAMP"
fi
for mod in $ABSENT; do
  if "$VENV/bin/python" -c "import $mod" 2>/dev/null; then
    echo "error: $mod imports in $VENV; the Slicer-package environment must not have it" >&2
    exit 1
  fi
done
"$VENV/bin/python" - <<EOF
import numpy, scipy, pydicom, SimpleITK, sys
have = {"numpy": numpy.__version__, "scipy": scipy.__version__, "pydicom": pydicom.__version__,
        "SimpleITK": SimpleITK.__version__}
want = dict(p.split("==") for p in "$SLICER_PACKAGES".split())
bad = {k: (have[k], v) for k, v in want.items() if have[k] != v}
sys.exit(f"the Slicer-package environment has the wrong versions: {bad}" if bad else 0)
EOF
echo "Slicer $SLICER_VERSION package set: $("$VENV/bin/python" -c 'import platform; print("Python", platform.python_version())'), $SLICER_PACKAGES, $MRML_STAND_IN; no $ABSENT" >&2
# the module folders on the path, as Slicer has them (nothing is installed into this environment)
export PYTHONPATH="$PWD/SmartBiopsyCore:$PWD/SmartBiopsy:$PWD/RegistrationFusion:$PWD/TrajectoryPlanner${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg
# the core and MRML suites unless test paths are given (options alone, e.g. -k radiomics, apply to those suites)
has_path=0
for arg in "$@"; do
  case "$arg" in Testing*|*.py|*::*) has_path=1 ;; esac
done
if [ "$has_path" = 0 ]; then
  set -- "$@" Testing/core Testing/mrml
fi
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --timeout=900 "$@"

#!/usr/bin/env bash
# The test suite: core, MRML (real headless scene), end-to-end command line, static checks; then, for the whole
# suite (no arguments, as CI runs it), the core and MRML suites again with the Python packages 3D Slicer 5.10
# bundles (scripts/test-slicer-env.sh). Extra pytest arguments run that subset in .venv only
# (e.g. scripts/test.sh -k phantom).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The OpenIGTLink interoperability tests need the real C++ library (Debian packages); they skip if absent.
if [ ! -d /usr/include/openigtlink ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenigtlink-dev openigtlink-examples g++ >/dev/null) \
    || echo "note: could not install libopenigtlink-dev/openigtlink-examples; interoperability tests will skip" >&2
fi
# dciodvfy (Debian package dicom3tools) checks every exported DICOM object; the check skips if it is absent.
if ! command -v dciodvfy >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools >/dev/null) \
    || echo "note: could not install dicom3tools; the dciodvfy checks of the DICOM export will skip" >&2
fi
# Headless Chromium (Debian package chromium) opens the report at 1400 and 800 px; the browser test skips if absent.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "note: could not install chromium; the report browser test will skip" >&2
fi
export MPLBACKEND=Agg
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 "$@" || status=$?
if [ "$#" -eq 0 ]; then
  bash scripts/test-slicer-env.sh || status=$?
fi
exit "$status"

"""Build the OpenIGTLink example peers shipped by Debian's ``openigtlink-examples`` (sources only).

Needs ``libopenigtlink-dev`` (headers + libOpenIGTLink.so) and ``g++``. Builds ReceiveServer,
StringEchoServer, StatusServer and TrackerClient into ``Testing/interop/build/`` (git-ignored) and
reuses them while the sources are unchanged. Run standalone (``python build_igtl_examples.py``) or let
the interoperability tests call :func:`build_examples`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EXAMPLES = Path("/usr/share/doc/openigtlink-examples/examples")
INCLUDE = Path("/usr/include/openigtlink")
PROGRAMS = {
    "ReceiveServer": "Receiver/ReceiveServer.cxx",
    "StringEchoServer": "String/StringEchoServer.cxx",
    "StatusServer": "Status/StatusServer.cxx",
    "TrackerClient": "Tracker/TrackerClient.cxx",
}
BUILD = Path(__file__).resolve().parent / "build"


def missing_requirements() -> str | None:
    """Why the peers cannot be built here, or None."""
    if shutil.which("g++") is None:
        return "g++ not found (apt-get install g++)"
    if not (INCLUDE / "igtlMessageBase.h").exists():
        return "OpenIGTLink headers not found (apt-get install libopenigtlink-dev)"
    if not EXAMPLES.is_dir():
        return "OpenIGTLink example sources not found (apt-get install openigtlink-examples)"
    return None


def _build_one(name: str, rel: str, out_dir: Path) -> Path:
    src = EXAMPLES / rel
    exe = out_dir / name
    if exe.exists() and exe.stat().st_mtime >= src.stat().st_mtime:
        return exe
    cmd = ["g++", "-O1", "-w", "-o", str(exe), f"-I{INCLUDE}", str(src), "-lOpenIGTLink"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"building {name} failed:\n{r.stderr[-2000:]}")
    return exe


def build_examples(out_dir: Path = BUILD) -> dict[str, Path]:
    """Paths of the built example programs (built when missing or stale)."""
    why = missing_requirements()
    if why:
        raise RuntimeError(why)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {n: pool.submit(_build_one, n, rel, out_dir) for n, rel in PROGRAMS.items()}
        return {n: f.result() for n, f in futures.items()}


if __name__ == "__main__":
    try:
        for n, p in build_examples().items():
            print(f"{n}: {p}")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)

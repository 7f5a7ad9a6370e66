"""Demo wall time per stage and in total on this machine, and peak memory (aim: total <= 60 s).

Runs ``smartbiopsy demo`` in a fresh process (so the phantom cache is cold) and prints the stage table
from summary.json next to the process's own wall time and peak resident memory.
Usage: python Testing/benchmarks/bench_demo.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-demo-"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(ROOT / m) for m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "SmartBiopsyLib.cli.main", "--quiet", "demo", "--out", str(out)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return proc.returncode
    print(proc.stdout)
    summary = json.loads((out / "summary.json").read_text())
    print(f"{'stage':<13} {'seconds':>8}")
    for s in summary["stages"]:
        print(f"{s['name']:<13} {s['seconds']:8.1f}")
    print(f"{'workflow':<13} {summary['total_seconds']:8.1f}")
    print(f"{'whole command':<13} {wall:8.1f}   (phantom generation and read-back included; aim <= 60 s)")
    print(f"peak resident memory {peak:.0f} MB; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Demo wall time per stage and in total, with the on-disk phantom cache, each figure beside its baseline.

1. Phantom for the demo (seed, robot frame "zframe-7tube"): generated (cold) against read from the on-disk
   cache (warm), in-process, in a temporary cache folder.
2. ``--demo``: ``smartbiopsy demo`` in fresh processes: this checkout with a cold cache, this checkout with a
   warm cache (the second run of a seed), and the baseline checkout (``--baseline``, default the main
   checkout next to the worktrees), with the stage table from summary.json.

The machine may be shared: absolute seconds depend on its load; the ratios measured in the same run are the
figures to quote. Usage: python Testing/benchmarks/bench_demo.py [--seed 0] [--demo] [--baseline DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner")


def phantom_rows(seed: int) -> list:
    for m in MODULES:
        sys.path.insert(0, str(ROOT / m))
    from SmartBiopsyCoreLib.phantom import sarcoma

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SMARTBIOPSY_PHANTOM_CACHE_DIR"] = tmp
        try:
            t0 = time.perf_counter()
            sarcoma.generate_phantom(seed, cache=False, disk_cache=True, robot_frame="zframe-7tube")
            cold = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in Path(tmp).glob("*")) / 2**20
            t0 = time.perf_counter()
            sarcoma.generate_phantom(seed, cache=False, disk_cache=True, robot_frame="zframe-7tube")
            warm = time.perf_counter() - t0
        finally:
            os.environ.pop("SMARTBIOPSY_PHANTOM_CACHE_DIR", None)
    return [("phantom: disk cache read vs generation (incl. write)", warm, cold, f"cache file {size:.0f} MB")]


def run_demo(checkout: Path, out: Path, seed: int, cache_dir: str | None) -> tuple[float, dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(checkout / m) for m in MODULES)
    if cache_dir:
        env["SMARTBIOPSY_PHANTOM_CACHE_DIR"] = cache_dir
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "SmartBiopsyLib.cli.main", "--quiet", "demo", "--seed", str(seed),
                        "--out", str(out)], env=env, capture_output=True, text=True, cwd=str(checkout))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"demo in {checkout} failed:\n{p.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return wall, {s["name"]: s["seconds"] for s in summary["stages"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demo", action="store_true", help="also run the whole demo three times (a few minutes)")
    ap.add_argument("--baseline", default=os.environ.get("SMARTBIOPSY_BASELINE", str(ROOT.parents[1] / "main")))
    args = ap.parse_args()
    print(f"cores {os.cpu_count()}; load {os.getloadavg()[0]:.1f}")
    rows = phantom_rows(args.seed)
    if args.demo:
        with tempfile.TemporaryDirectory() as tmp:
            cache = str(Path(tmp) / "cache")
            cold, st_cold = run_demo(ROOT, Path(tmp) / "cold", args.seed, cache)
            warm, st_warm = run_demo(ROOT, Path(tmp) / "warm", args.seed, cache)
            base = Path(args.baseline)
            if (base / "SmartBiopsy").is_dir() and base.resolve() != ROOT.resolve():
                b, st_b = run_demo(base, Path(tmp) / "base", args.seed, None)
                rows.append(("demo, first run (cold phantom cache) vs baseline", cold, b, ""))
                rows.append(("demo, second run (warm phantom cache) vs baseline", warm, b, ""))
                for k in st_warm:
                    rows.append((f"  stage {k} (warm) vs baseline", st_warm[k], st_b.get(k), ""))
            else:
                rows.append(("demo, second run (warm) vs first run (cold)", warm, cold, ""))
    w = max(len(r[0]) for r in rows)
    print(f"\n{'measurement':<{w}} | {'this (s)':>9} | {'baseline (s)':>12} | {'ratio':>7} | notes")
    print("-" * (w + 50))
    for name, a, b, note in rows:
        ratio = f"{b / a:6.2f}x" if b else "   -"
        print(f"{name:<{w}} | {a:9.2f} | {b if b is not None else float('nan'):12.2f} | {ratio:>7} | {note}")
    print("(ratio = baseline / this, measured in this run; absolute seconds depend on the machine's load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

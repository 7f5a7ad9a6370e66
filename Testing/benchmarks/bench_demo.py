"""Demo wall time per stage and in total, with the on-disk phantom cache, each figure beside its baseline.

1. Phantom for the demo (seed, robot frame "zframe-7tube"): generated (cold) against read from the on-disk
   cache (warm), in-process, in a temporary cache folder.
2. ``--demo``: ``smartbiopsy demo`` in fresh processes: this checkout with a cold cache, this checkout with a
   warm cache (the second run of a seed), and the baseline checkout (``--baseline``, default the main
   checkout next to the worktrees; e.g. ``git worktree add /tmp/base <rev>``) cold and warm, with the stage
   table from summary.json, the CPU seconds of each process (steadier than wall time on a shared machine) and
   a check that targets, best paths and the MRI->CT transform are identical to the baseline's.

The runs are interleaved (this, baseline, this, baseline); ``--serial`` adds a warm run of this checkout with
``SMARTBIOPSY_SERIAL=1`` (every step in order in one process) to show what the overlapped steps alone change.
The machine may be shared: absolute seconds depend on its load; the ratios measured in the same run are the
figures to quote. Usage: python Testing/benchmarks/bench_demo.py [--seed 0] [--demo] [--serial] [--baseline DIR]
[--keep DIR]
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


def child_cpu_s() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


CPU: dict = {}  # output folder -> CPU seconds of its demo process


def run_demo(checkout: Path, out: Path, seed: int, cache_dir: str | None, serial: bool = False) -> tuple[float, dict]:
    c0 = child_cpu_s()
    try:
        return _run_demo(checkout, out, seed, cache_dir, serial)
    finally:
        CPU[str(out)] = child_cpu_s() - c0


def results_of(out: Path) -> dict:
    """What must not change: the targets (MRI and CT points), each target's best path, the MRI->CT matrix."""
    targets = json.loads((out / "characterisation" / "targets.json").read_text())["targets"]
    plan = json.loads((out / "plan" / "plan.json").read_text())
    best = {t["target"]: t for t in plan["trajectories"] if t.get("rank") == 1}
    fusion = json.loads((out / "registration" / "mri_to_ct.json").read_text())
    return {"targets": {t["region"]: (t["point_ras"], t["point_ct_ras"]) for t in targets},
            "best": {k: (v["entry_ras"], v["target_ras"], v["score"]) for k, v in best.items()},
            "matrix": fusion}


def result_differences(a: dict, b: dict) -> str:
    """One line: the largest coordinate difference of targets and best paths, and whether all is identical."""
    import numpy as np

    def flat(x):
        return np.concatenate([flat(v) for v in (x.values() if isinstance(x, dict) else x)]) \
            if isinstance(x, (dict, list, tuple)) else np.atleast_1d(np.asarray(x, float))

    parts = []
    for key in ("targets", "best"):
        if a[key].keys() != b[key].keys():
            parts.append(f"{key}: different names {sorted(a[key])} / {sorted(b[key])}")
            continue
        d = max(float(np.abs(flat(a[key][k]) - flat(b[key][k])).max()) for k in a[key])
        parts.append(f"{key}: max difference {d:.3g}")
    same = a == b
    return ("identical" if same else "DIFFERENT") + " (" + ", ".join(parts) + ")"


def _run_demo(checkout: Path, out: Path, seed: int, cache_dir: str | None, serial: bool = False) -> tuple[float, dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(checkout / m) for m in MODULES)
    env.pop("SMARTBIOPSY_SERIAL", None)
    if serial:  # every step in order in one process (no worker thread, no child process)
        env["SMARTBIOPSY_SERIAL"] = "1"
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
    ap.add_argument("--serial", action="store_true",
                    help="also run this checkout warm with SMARTBIOPSY_SERIAL=1 (the overlap's own effect)")
    ap.add_argument("--keep", default="", help="keep the demo outputs in this folder (for a closer comparison)")
    args = ap.parse_args()
    print(f"cores {os.cpu_count()}; load {os.getloadavg()[0]:.1f}")
    rows = phantom_rows(args.seed)
    if args.demo:
        with tempfile.TemporaryDirectory() as tmp:
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                tmp = args.keep
            cache = str(Path(tmp) / "cache")
            base = Path(args.baseline)
            with_base = (base / "SmartBiopsy").is_dir() and base.resolve() != ROOT.resolve()
            bcache = str(Path(tmp) / "base_cache")
            # interleaved (this, baseline, this, baseline): a load that changes during the run hits both alike
            cold, st_cold = run_demo(ROOT, Path(tmp) / "cold", args.seed, cache)
            if with_base:
                b_cold, _ = run_demo(base, Path(tmp) / "base_cold", args.seed, bcache)
            warm, st_warm = run_demo(ROOT, Path(tmp) / "warm", args.seed, cache)
            if with_base:
                b, st_b = run_demo(base, Path(tmp) / "base", args.seed, bcache)
            if args.serial:
                serial, _ = run_demo(ROOT, Path(tmp) / "serial", args.seed, cache, serial=True)
                rows.append(("demo, warm: overlapped steps vs the same code with SMARTBIOPSY_SERIAL=1", warm, serial,
                             f"CPU {CPU[str(Path(tmp) / 'warm')]:.1f} s vs {CPU[str(Path(tmp) / 'serial')]:.1f} s"))
            if with_base:
                cpu = {k: CPU[str(Path(tmp) / k)] for k in ("cold", "warm", "base_cold", "base")}
                rows.append(("demo, first run (cold phantom cache) vs baseline cold", cold, b_cold,
                             f"CPU {cpu['cold']:.1f} s vs {cpu['base_cold']:.1f} s"))
                rows.append(("demo, second run (warm phantom cache) vs baseline warm", warm, b,
                             f"CPU {cpu['warm']:.1f} s vs {cpu['base']:.1f} s"))
                for k in st_warm:
                    rows.append((f"  stage {k} (warm) vs baseline", st_warm[k], st_b.get(k), ""))
                check = result_differences(results_of(Path(tmp) / "warm"), results_of(Path(tmp) / "base"))
                rows.append(("results (targets, best paths, MRI->CT) vs baseline", 0.0, None, check))
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

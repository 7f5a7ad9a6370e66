"""Sampling-record timings: journal append (fsync) and replay; vectorised per-participant statistics vs a loop.

Rows, each measured side by side in one run:
- durable append of one specimen record (write + fsync + atomic snapshot) vs a plain unsynced append of the
  same line (the cost of durability);
- opening (replaying and validating) a journal of N records;
- per-participant mean/range over a large synthetic cohort: numpy group-by vs a per-participant Python loop
  (baseline), with the maximum absolute difference as the accuracy column.

    .venv/bin/python Testing/benchmarks/bench_records.py [--records 200] [--sites 30000]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "SmartBiopsy"))
sys.path.insert(0, str(ROOT / "SmartBiopsyCore"))

from SmartBiopsyLib.records import stats  # noqa: E402
from SmartBiopsyLib.records.specimen_journal import SpecimenJournal  # noqa: E402


def _record(i: int) -> dict:
    return {"pot_id": f"B-{i:06d}", "region": "ABC"[i % 3], "target_name": "t", "operator": "op",
            "needle_tip_ras": [i, 0, 0], "needle_direction_ras": [0, 0, 1], "notch_roi": {"mode": "side_notch"},
            "values": {m: {"mean": 1.0 * i, "median": 1.0 * i, "min": 0.0, "sd": 1.0, "n_voxels": 10,
                           "volume_mm3": 20.0} for m in ("adc", "ff", "ef")}}


def bench_journal(n: int, folder: Path) -> list[tuple]:
    path = folder / "bench.jsonl"
    t0 = time.perf_counter()
    with SpecimenJournal(path) as j:
        for i in range(n):
            j.append_specimen(_record(i))
    t_durable = (time.perf_counter() - t0) / n
    lines = path.read_bytes().splitlines(keepends=True)
    plain = folder / "plain.jsonl"
    t0 = time.perf_counter()
    for line in lines:
        with open(plain, "ab") as fh:
            fh.write(line)
    t_plain = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    with SpecimenJournal(path) as j:
        ok = len(j.specimens) == n
    t_open = time.perf_counter() - t0
    return [
        ("journal append (fsync + snapshot)", f"{1e3 * t_durable:.2f} ms", "all records readable" if ok else "LOST",
         f"{t_durable / t_plain:.0f}x plain append ({1e3 * t_plain:.3f} ms)"),
        (f"journal open/replay, {n} records", f"{1e3 * t_open:.1f} ms", f"{n} records", "-"),
    ]


def bench_summary(n_sites: int) -> list[tuple]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, n_sites // 3, n_sites).astype(str)
    vals = {"adc": rng.normal(1200, 300, n_sites), "ki67": rng.uniform(0, 80, n_sites)}
    vals["ki67"][rng.random(n_sites) < 0.1] = np.nan
    t0 = time.perf_counter()
    s = stats.per_participant_summary(ids, vals)
    t_vec = time.perf_counter() - t0
    t0 = time.perf_counter()
    err = 0.0
    for idx, p in enumerate(s.participants):  # baseline: per-participant loop
        m = ids == p
        for k, col in vals.items():
            v = col[m][~np.isnan(col[m])]
            if v.size:
                err = max(err, abs(v.mean() - s.mean[k][idx]))
            if v.size >= 2:
                err = max(err, abs(v.max() - v.min() - s.range[k][idx]))
    t_loop = time.perf_counter() - t0
    return [(f"per-participant mean/range, {n_sites} sites", f"{1e3 * t_vec:.1f} ms", f"max |diff| {err:.1e}",
             f"{t_loop / t_vec:.0f}x faster than loop ({1e3 * t_loop:.0f} ms)")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--sites", type=int, default=30000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-records-") as tmp:
        rows = bench_journal(args.records, Path(tmp)) + bench_summary(args.sites)
    widths = [max(len(str(r[i])) for r in rows + [("what", "time", "accuracy", "vs baseline")]) for i in range(4)]
    for r in [("what", "time", "accuracy", "vs baseline")] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

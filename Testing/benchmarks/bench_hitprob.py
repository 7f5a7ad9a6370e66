"""Benchmark: hit probability (vectorised Monte Carlo) against the brute-force oracle (one sample at a time,
explicit voxelisation of the notch) on the phantom's habitat map, and the cost of target selection.
Prints a table. Run: .venv/bin/python Testing/benchmarks/bench_hitprob.py [oracle samples, default 2000]"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner", "Testing/core"):
    sys.path.insert(0, str(ROOT / m))

import numpy as np  # noqa: E402

from hitprob_oracle import brute_force_hit_probability  # noqa: E402
from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom  # noqa: E402
from SmartBiopsyLib.characterise import hitprob, targets  # noqa: E402

NEEDLE = "15G/16G-16cm"
REG_COV = np.diag([1.0, 2.0, 4.0])
POINTS = [("A", (18, 102, 149), None), ("B", (16, 118, 149), (0.6, 0.64, 0.48)), ("C", (18, 121, 171), None),
          ("B", (17, 108, 172), (0.6, 0.64, 0.48))]


def main(n_oracle: int = 2000):
    hab = generate_phantom(0).truth.mri_habitats
    print(f"phantom seed 0 habitat map {hab.array.shape} voxels {np.round(hab.spacing, 2).tolist()} mm; "
          f"registration SD (1, 1.41, 2) mm, lateral 2 mm RMS, {NEEDLE} side notch")
    print(f"{'region':6} {'direction':18} {'fast p':>8} {'SE':>6} {'fast s':>7} {'oracle p':>9} {'SE':>6} "
          f"{'oracle s':>9} {'diff pp':>8}")
    for region, kji, direction in POINTS:
        point = hab.kji_to_ras_points(np.array(kji)[None])[0]
        t = time.perf_counter()
        fast = hitprob.hit_probability(hab, region, point, registration_error=REG_COV, needle=NEEDLE,
                                       direction=direction, n_samples=40000, seed=1)
        t_fast = time.perf_counter() - t
        t = time.perf_counter()
        p, se = brute_force_hit_probability(hab, hitprob.REGION_CODES[region], point, REG_COV, 2.0, direction,
                                            NEEDLE, "side-notch", n_oracle, seed=11)
        t_or = time.perf_counter() - t
        print(f"{region:6} {str(direction or 'axial, uniform'):18} {fast.probability:8.4f} {fast.standard_error:6.4f} "
              f"{t_fast:7.2f} {p:9.4f} {se:6.4f} {t_or:9.1f} {100 * (fast.probability - p):8.2f}")
    print(f"(fast: 40000 samples; oracle: {n_oracle} samples; per-sample cost fast "
          f"{t_fast / 40000 * 1e6:.0f} us vs oracle {t_or / n_oracle * 1e6:.0f} us)")
    for samples in (0, 4000):
        t = time.perf_counter()
        ts = targets.plan_targets(hab, predicted_tre_mm=1.5, hit_samples=samples)
        dt = time.perf_counter() - t
        desc = "deepest point only" if samples == 0 else f"8 candidates x {samples} samples"
        print(f"target selection ({desc}): {dt:.2f} s; " + ", ".join(
            f"{x.region} depth {x.depth_mm:.1f} mm" + ("" if x.hit_probability is None else
                                                        f" hit {100 * x.hit_probability:.1f}%") for x in ts))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)

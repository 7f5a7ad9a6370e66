"""Phantom generation time and size at default resolution, and DICOM load time of the phantom CT.

Aim (foundation issue): generation <= 30 s on 2 cores. Baseline for the DICOM load: SimpleITK's
ImageSeriesReader on the same files, measured side by side. Usage: python Testing/benchmarks/bench_phantom.py [--seeds 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner"):
    sys.path.insert(0, str(ROOT / m))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    import numpy as np
    import SimpleITK as sitk

    from SmartBiopsyCoreLib.dataio.dicomio import load_dicom_series
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

    rows = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        case = generate_phantom(seed, cache=False)
        gen = time.perf_counter() - t0
        mem = sum(v.array.nbytes for v in [case.ct, case.ct_labels, case.ct_habitats, *case.mri.values()]) / 2**20
        with tempfile.TemporaryDirectory() as tmp:
            t1 = time.perf_counter()
            case.write(tmp, dicom=True)
            wr = time.perf_counter() - t1
            disk = _size(Path(tmp)) / 2**20
            ct_dir = os.path.join(tmp, "dicom", "ct")
            t2 = time.perf_counter()
            vol = load_dicom_series(ct_dir)
            ours = time.perf_counter() - t2
            t3 = time.perf_counter()
            r = sitk.ImageSeriesReader()
            r.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(ct_dir))
            img = r.Execute()
            base = time.perf_counter() - t3
            same = np.array_equal(sitk.GetArrayFromImage(img), vol.array)
        rows.append((seed, gen, case.timings["ct_s"], case.timings["mri_s"], mem, wr, disk, ours, base, same,
                     case.truth.tumour_volume_ml, len(case.truth.capsules_ct)))
    print(f"{'seed':>4} {'gen s':>6} {'CT s':>5} {'MRI s':>5} {'RAM MB':>7} {'write s':>7} {'disk MB':>7} "
          f"{'CT DICOM load s':>15} {'SimpleITK s':>11} {'ratio':>6} {'identical':>9} {'tumour mL':>9} {'caps':>4}")
    for s, g, c, m, mem, wr, d, o, b, same, vol, n in rows:
        print(f"{s:>4} {g:6.1f} {c:5.1f} {m:5.1f} {mem:7.0f} {wr:7.1f} {d:7.0f} {o:15.2f} {b:11.2f} {o / b:6.2f} "
              f"{str(same):>9} {vol:9.0f} {n:4d}")
    gens = [r[1] for r in rows]
    print(f"generation: median {np.median(gens):.1f} s (aim <= 30 s on 2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

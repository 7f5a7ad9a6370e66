"""Benchmark: ADC fit (vectorised WLLS) vs a naive per-voxel scipy curve_fit on the phantom MRI; habitats,
targets and radiomics timings. Prints a table. Run: .venv/bin/python Testing/benchmarks/bench_maps.py"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner"):
    sys.path.insert(0, str(ROOT / m))

import numpy as np  # noqa: E402
from scipy.optimize import curve_fit  # noqa: E402

from SmartBiopsyLib.characterise import habitats, maps, radiomics as radiomics_features

from SmartBiopsyLib.characterise import targets  # noqa: E402
from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom  # noqa: E402


def main(n_sub: int = 2000):
    case = generate_phantom(seed=0)
    dwi = {b: case.mri[f"dwi_b{int(b)}"] for b in case.truth.b_values}
    rows = []
    t = time.perf_counter()
    adc = maps.compute_adc(dwi)
    t_adc = time.perf_counter() - t
    n_fit = adc.meta["voxels_fitted"]
    # naive baseline on a subsample of the same voxels, extrapolated per voxel
    valid = np.argwhere(np.isfinite(adc.array))
    rng = np.random.default_rng(0)
    pick = valid[rng.choice(len(valid), n_sub, replace=False)]
    b = np.array(sorted(dwi), float)
    stack = np.stack([dwi[x].array for x in b])
    f = lambda bb, s0, d: s0 * np.exp(-bb * d * 1e-6)
    t = time.perf_counter()
    base = []
    for k, j, i in pick:
        y = stack[:, k, j, i].astype(float)
        try:
            p, _ = curve_fit(f, b, y, p0=(y[0], 1000.0), maxfev=200)
            base.append(p[1])
        except RuntimeError:
            base.append(np.nan)
    t_base = time.perf_counter() - t
    per_vox_ours = t_adc / n_fit
    per_vox_base = t_base / n_sub
    truth = case.truth.adc.array[tuple(pick.T)]
    ours = adc.array[tuple(pick.T)]
    rows.append(("ADC WLLS (vectorised)", f"{t_adc:.2f} s / {n_fit} vox", f"{per_vox_ours * 1e6:.2f} us/vox",
                 f"med |err| {np.nanmedian(np.abs(ours - truth) / truth):.2%}"))
    rows.append((f"ADC curve_fit baseline ({n_sub} vox)", f"{t_base:.2f} s", f"{per_vox_base * 1e6:.0f} us/vox",
                 f"med |err| {np.nanmedian(np.abs(np.array(base) - truth) / truth):.2%}; ratio x{per_vox_base / per_vox_ours:.0f}"))
    ff = maps.compute_ff(case.mri["dixon_water"], case.mri["dixon_fat"])
    ef = maps.compute_ef(case.mri["t1_pre"], case.mri["t1_post"])
    tm = case.truth.tumour_mask_mri
    for mode in ("median", "kmeans"):
        t = time.perf_counter()
        res = habitats.compute_habitats(adc, ef, ff, tm, habitats.HabitatConfig(mode=mode))
        th = time.perf_counter() - t
        tr = case.truth.mri_habitats.array
        dice = [2 * ((res.labels.array == c) & (tr == c)).sum() / ((res.labels.array == c).sum() + (tr == c).sum())
                for c in (1, 2, 3)]
        t = time.perf_counter()
        ts = targets.plan_targets(res.labels, {"adc": adc, "ef": ef, "ff": ff})
        tt = time.perf_counter() - t
        rows.append((f"habitats {mode} ({tm.array.sum()} vox, {case.truth.tumour_volume_ml:.0f} ml)", f"{th:.2f} s",
                     "", "Dice A/B/C " + "/".join(f"{d:.3f}" for d in dice)))
        rows.append((f"targets ({mode})", f"{tt:.2f} s", "", "depths " + "/".join(f"{x.depth_mm:.0f}" for x in ts) + " mm"))
    t = time.perf_counter()
    rr = radiomics_features.compute_radiomics(res.labels, {"adc": adc})
    rows.append(("radiomics 3 regions x ADC", f"{time.perf_counter() - t:.2f} s", "",
                 f"{sum(len(r.features) for r in rr)} features"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    print(" | ".join(h.ljust(w[i]) for i, h in enumerate(("step", "time", "per voxel", "accuracy / ratio"))))
    for r in rows:
        print(" | ".join(c.ljust(w[i]) for i, c in enumerate(r)))


if __name__ == "__main__":
    main()

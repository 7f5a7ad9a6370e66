"""Benchmark: needle detection on a 512 x 512 x 300 CT and notch extraction (3 sites x 3 maps).

Run:  .venv/bin/python Testing/benchmarks/bench_sampling.py [--repeats 3]

Side by side in one run:
* needle detection - SmartBiopsy (search cylinder, RANSAC, intensity-weighted axis, half-maximum tip) vs a
  naive baseline (threshold the whole volume, PCA of every metal voxel, deepest voxel as tip). The CT has
  cortical bone above the metal threshold away from the path, as real CTs do.
* notch extraction - SmartBiopsy (ROI mapped into each map's own grid, supersampled fractional weights)
  vs the usual baseline (resample every map onto the CT grid, then average the CT voxels inside the ROI).
  Maps are linear fields, so the exact ROI mean is the value at the ROI centroid.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for _m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner"):
    sys.path.insert(0, str(ROOT / _m))

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid, resample  # noqa: E402
from SmartBiopsyLib.sampling.needle import detect_needle  # noqa: E402
from SmartBiopsyLib.sampling.needle_sim import simulate_confirmation_ct  # noqa: E402
from SmartBiopsyLib.sampling.notch import notch_roi, sample_maps  # noqa: E402


def _rot(axis, deg):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def make_ct(shape=(300, 512, 512), spacing=(0.78, 0.78, 1.0), seed=0) -> RasVolume:
    """Abdomen-like CT: air, water body, fat rim, vertebra with a cortical shell above 1500 HU, noise."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    origin = -0.5 * np.array([ni * spacing[0], nj * spacing[1], nk * spacing[2]])
    grid = make_grid(origin, spacing, shape)
    jj, ii = np.mgrid[0:nj, 0:ni]
    x = origin[0] + ii * spacing[0]
    y = origin[1] + jj * spacing[1]
    body = (x / 170) ** 2 + (y / 130) ** 2 < 1
    inner = (x / 155) ** 2 + (y / 115) ** 2 < 1
    r_vert = np.hypot(x, y + 80)
    plane = np.full((nj, ni), -1000.0, np.float32)
    plane[body] = -100.0
    plane[inner] = 35.0
    plane[r_vert < 22] = 300.0
    plane[(r_vert >= 18) & (r_vert < 22)] = 1800.0  # cortical shell
    arr = np.empty(shape, np.int16)
    for k in range(nk):
        arr[k] = np.rint(plane + rng.standard_normal((nj, ni), dtype=np.float32) * 10.0)
    return RasVolume(arr, grid, "bench CT")


def naive_detect(ct: RasVolume, entry, target, threshold=1500.0):
    """Baseline: whole-volume threshold + PCA of every metal voxel; tip = deepest voxel along the axis."""
    kji = np.argwhere(ct.array > threshold)
    pts = ct.kji_to_ras_points(kji)
    c = pts.mean(axis=0)
    _, _, vt = np.linalg.svd(pts - c, full_matrices=False)
    a = vt[0]
    d = np.asarray(target, float) - np.asarray(entry, float)
    if a @ d < 0:
        a = -a
    t = (pts - c) @ a
    return c + t.max() * a, a


def naive_notch(roi, maps, mri_to_ct, ct):
    """Baseline: resample each map onto the CT grid (linear), average CT voxels whose centres are inside."""
    box = _ct_box(ct, roi)
    sub = RasVolume(np.zeros(ct.array.shape, np.uint8), ct.ijk_to_ras, "ref")
    out = {}
    for name, vol in maps.items():
        res = resample(vol, sub, mri_to_ct, order=1)
        k0, k1, j0, j1, i0, i1 = box
        kk, jj, ii = np.meshgrid(np.arange(k0, k1), np.arange(j0, j1), np.arange(i0, i1), indexing="ij")
        kji = np.stack([kk.ravel(), jj.ravel(), ii.ravel()], 1)
        inside = roi.contains(ct.kji_to_ras_points(kji))
        out[name] = float(res.array[tuple(kji[inside].T)].mean())
    return out


def _ct_box(ct, roi):
    ijk = ct.ras_to_ijk_points(roi.corners_ras())
    lo = np.maximum(np.floor(ijk.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(ijk.max(0)).astype(int) + 2, ct.array.shape[::-1])
    return lo[2], hi[2], lo[1], hi[1], lo[0], hi[0]


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    ct = make_ct()
    print(f"CT {ct.array.shape[::-1]} (i, j, k) voxels {tuple(np.round(ct.spacing, 2))} mm, built in "
          f"{time.perf_counter() - t0:.1f} s")
    direction = np.array([0.45, 1.0, 0.3]) / np.linalg.norm([0.45, 1.0, 0.3])
    target = np.array([25.0, -10.0, 12.0])
    entry = target + 110.0 * direction  # anterior entry, needle pointing posteriorly
    sim = simulate_confirmation_ct(ct, entry, target, "17G/18G-20mm", lateral_error_mm=2.0, depth_error_mm=-1.5,
                                   seed=3)
    truth = sim.truth

    rows = []
    t_ours, det = timed(lambda: detect_needle(sim.ct, entry, target, needle="17G/18G-20mm"), args.repeats)
    t_naive, (tip_n, ax_n) = timed(lambda: naive_detect(sim.ct, entry, target), args.repeats)

    def ang(a, b):
        return float(np.degrees(np.arccos(min(1.0, abs(float(np.dot(a, b)))))))

    rows.append(("needle detection 512x512x300", t_ours, t_naive,
                 f"tip {np.linalg.norm(det.tip_ras - truth.tip_ras):.2f} mm, axis {ang(det.axis, truth.axis):.2f} deg",
                 f"tip {np.linalg.norm(tip_n - truth.tip_ras):.1f} mm, axis {ang(ax_n, truth.axis):.1f} deg"))

    # maps on an MRI grid in another pose (1.5 x 1.5 x 6 mm), linear fields
    m2c = np.eye(4)
    m2c[:3, :3] = _rot([0.3, 0.2, 1.0], 10.0)
    m2c[:3, 3] = [5.0, -12.0, 20.0]
    shape_mri = (33, 200, 264)
    grid = make_grid([-198.0, -150.0, -99.0], (1.5, 1.5, 6.0), shape_mri)
    base = RasVolume(np.zeros(shape_mri, np.float32), grid, "grid")
    kk, jj, ii = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape_mri], indexing="ij")
    xyz = [grid[r, 0] * ii + grid[r, 1] * jj + grid[r, 2] * kk + grid[r, 3] for r in range(3)]
    coeffs = {"adc": (1200.0, (3.0, -2.0, 1.5)), "ff": (10.0, (0.02, 0.01, -0.03)), "ef": (60.0, (0.1, -0.2, 0.15))}
    maps = {n: base.with_array((c0 + g[0] * xyz[0] + g[1] * xyz[1] + g[2] * xyz[2]).astype(np.float32), name=n)
            for n, (c0, g) in coeffs.items()}
    del kk, jj, ii, xyz
    sites = [det.tip_ras, det.tip_ras - 15.0 * det.axis, det.tip_ras + 10.0 * det.axis]
    rois = [notch_roi(s, det.axis, "side-notch", "17G/18G-20mm") for s in sites[:2]] + \
           [notch_roi(sites[2], det.axis, "tip-distal")]
    c2m = np.linalg.inv(m2c)

    def exact(roi):
        c = c2m[:3, :3] @ roi.centre_ras + c2m[:3, 3]
        return {n: c0 + float(np.dot(g, c)) for n, (c0, g) in coeffs.items()}

    def ours():
        return [sample_maps(r, maps, m2c) for r in rois]

    def naive():
        return [naive_notch(r, maps, m2c, sim.ct) for r in rois]

    t_notch, vals = timed(ours, args.repeats)
    t_notch_naive, vals_n = timed(naive, 1)
    err = max(abs(v.maps[n].mean - exact(r)[n]) / abs(exact(r)[n]) for v, r in zip(vals, rois) for n in maps)
    err_n = max(abs(v[n] - exact(r)[n]) / abs(exact(r)[n]) for v, r in zip(vals_n, rois) for n in maps)
    rows.append(("notch: 3 sites x 3 maps", t_notch, t_notch_naive, f"max rel. error {100 * err:.3f} %",
                 f"max rel. error {100 * err_n:.3f} %"))

    print()
    print(f"{'task':<32} {'SmartBiopsy':>12} {'baseline':>10} {'speed-up':>9}  {'accuracy (ours)':<34} accuracy (baseline)")
    for name, a, b, acc, acc_b in rows:
        print(f"{name:<32} {a:>10.3f} s {b:>8.3f} s {b / a:>8.1f}x  {acc:<34} {acc_b}")
    print("\nbaselines: detection = whole-volume threshold + PCA, deepest voxel as tip; notch = resample maps to the"
          " CT grid (linear) and average voxel centres inside the ROI")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

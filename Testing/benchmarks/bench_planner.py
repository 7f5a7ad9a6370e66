"""Planner benchmark (one run, side by side): full three-target plan on a 512 x 512 x 300 CT, path-evaluation
rate of the distance-map engine vs a Percutaneous-Approach-Analysis-style mesh baseline
(vtkModifiedBSPTree.IntersectWithLine per entry and structure surface, no margins), and scipy EDT vs
SimpleITK Maurer on 2 threads.

    .venv/bin/python Testing/benchmarks/bench_planner.py [--quick]

--quick uses a 256 x 256 x 150 CT (same anatomy) for a fast smoke run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner"):
    sys.path.insert(0, str(ROOT / _m))

import numpy as np  # noqa: E402

from TrajectoryPlannerLib.planning import engine

from SmartBiopsyCoreLib.phantom import abdomen as synthetic  # noqa: E402
from TrajectoryPlannerLib.planning.needles import get_needle  # noqa: E402
from SmartBiopsyCoreLib.body import BODY_HU_THRESHOLD  # noqa: E402
from TrajectoryPlannerLib.planning.risk import EntryExclusion  # noqa: E402


def mesh_baseline(labels, risk_labels, target, entries, max_paths, decimate=0.0):
    """Paths/s of straight-line intersection tests against each structure's surface mesh (no margins)."""
    import vtk
    from vtk.util import numpy_support

    arr = np.asarray(labels.array)
    locators = []
    t0 = time.perf_counter()
    for value in risk_labels:
        mask = (arr == value).astype(np.uint8)
        if not mask.any():
            continue
        img = vtk.vtkImageData()
        img.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
        img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.ravel(), deep=True))
        fe = vtk.vtkFlyingEdges3D()
        fe.SetInputData(img)
        fe.SetValue(0, 0.5)
        tf = vtk.vtkTransform()
        tf.SetMatrix(labels.ijk_to_ras.ravel().tolist())
        src = fe
        if decimate > 0:
            src = vtk.vtkDecimatePro()
            src.SetInputConnection(fe.GetOutputPort())
            src.SetTargetReduction(decimate)
            src.PreserveTopologyOn()
        tp = vtk.vtkTransformPolyDataFilter()
        tp.SetInputConnection(src.GetOutputPort())
        tp.SetTransform(tf)
        tp.Update()
        loc = vtk.vtkModifiedBSPTree()
        loc.SetDataSet(tp.GetOutput())
        loc.BuildLocator()
        locators.append((loc, tp.GetOutput()))
    build_s = time.perf_counter() - t0
    pts = vtk.vtkPoints()
    ids = vtk.vtkIdList()
    n = min(max_paths, len(entries))
    tgt = [float(v) for v in target]
    t0 = time.perf_counter()
    hits = 0
    for e in entries[:n]:
        p0 = [float(v) for v in e]
        hit = False
        for loc, _ in locators:
            if loc.IntersectWithLine(p0, tgt, 1e-3, pts, ids):
                hit = True
                break  # a PAA-style test stops at the first structure hit
        hits += hit
    dt = time.perf_counter() - t0
    return n / dt, build_s, sum(pd.GetNumberOfCells() for _, pd in locators), hits / n


def edt_compare(mask, spacing_kji, threads=2):
    import SimpleITK as sitk
    from scipy import ndimage

    t0 = time.perf_counter()
    d_scipy = ndimage.distance_transform_edt(~mask, sampling=spacing_kji)
    t_scipy = time.perf_counter() - t0
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_kji[::-1]))
    f = sitk.SignedMaurerDistanceMapImageFilter()
    f.SetInsideIsPositive(False)
    f.SetSquaredDistance(False)
    f.SetUseImageSpacing(True)
    f.SetNumberOfThreads(threads)
    t0 = time.perf_counter()
    d_itk = sitk.GetArrayFromImage(f.Execute(img))
    t_itk = time.perf_counter() - t0
    out = ~mask
    err = float(np.abs(d_itk[out] - d_scipy[out]).max())
    return t_scipy, t_itk, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--needle", default="15G/16G-16cm")
    ap.add_argument("--planning-spacing", type=float, default=1.6, help="pooled planning grid spacing (mm)")
    args = ap.parse_args()
    if args.quick:
        spacing, fov = (1.6, 1.6, 2.0), (409.6, 409.6, 300.0)
    else:
        spacing, fov = (0.8, 0.8, 1.0), (409.6, 409.6, 300.0)
    t0 = time.perf_counter()
    ct, labels, targets = synthetic.make_abdomen(spacing, fov)
    print(f"synthetic CT {ct.array.shape[::-1]} (i, j, k) voxels {tuple(spacing)} mm built in "
          f"{time.perf_counter() - t0:.1f} s; needle {args.needle}; cores {os.cpu_count()}")
    needle = get_needle(args.needle)
    rows = []

    # 1. full plan (risk structures, distance maps, three targets, shared entry)
    settings = engine.PlanSettings(threads=2)
    t0 = time.perf_counter()
    res = engine.plan(ct, targets, needle, labelmaps=[(labels, synthetic.RISK_LABELS)], settings=settings)
    t_plan = time.perf_counter() - t0
    tm = res.timings_s
    rows.append(("full 3-target plan, CT grid (incl. risk + maps)", f"{t_plan:.2f} s", "aim <= 3 s",
                 "; ".join(f"{k} {v:.2f}" for k, v in tm.items()) + f"; bound {res.error_bound_mm:.2f} mm"))
    pooled = engine.PlanSettings(threads=2, planning_spacing_mm=args.planning_spacing)
    t0 = time.perf_counter()
    res_p = engine.plan(ct, targets, needle, labelmaps=[(labels, synthetic.RISK_LABELS)], settings=pooled)
    t_pooled = time.perf_counter() - t0
    rows.append((f"full 3-target plan, pooled to ~{args.planning_spacing} mm", f"{t_pooled:.2f} s",
                 f"{t_plan / t_pooled:.1f}x faster",
                 "; ".join(f"{k} {v:.2f}" for k, v in res_p.timings_s.items())
                 + f"; bound {res_p.error_bound_mm:.2f} mm; best scores "
                 + ", ".join(f"{t.target} {t.score:.3f}" for t in res_p.trajectories if t.rank == 1)
                 + " vs " + ", ".join(f"{t.score:.3f}" for t in res.trajectories if t.rank == 1)))

    short = get_needle("15G/16G-10cm")
    t0 = time.perf_counter()
    res_s = engine.plan(ct, targets, short, labelmaps=[(labels, synthetic.RISK_LABELS)], settings=pooled)
    t_short = time.perf_counter() - t0
    rows.append((f"  same, pooled, needle {short.name} (reach {short.max_reach_mm:.0f} mm)", f"{t_short:.2f} s",
                 "aim <= 3 s", "; ".join(f"{k} {v:.2f}" for k, v in res_s.timings_s.items())
                 + f"; {len(res_s.trajectories)} trajectories"))

    # 2. path evaluation rate vs mesh baseline, on the same candidate paths to target A
    from TrajectoryPlannerLib.planning.risk import build_risk_model, crop_volume  # noqa: F401
    lo, hi = _crop_of(ct, targets, needle, settings)
    grid = crop_volume(ct, lo, hi)
    lab_c = crop_volume(labels, lo, hi)
    rm = build_risk_model(grid, [(lab_c, synthetic.RISK_LABELS)], exclusion=EntryExclusion())
    maps = engine.DistanceMaps(rm, settings.distance_cap_mm, threads=2)
    entries = engine.oblique_entries(rm, settings.entry_spacing_mm)
    tA = np.asarray(targets[0]["point_ras"], float)
    L = np.linalg.norm(entries - tA, axis=1)
    pre = entries[(L <= needle.max_reach_mm) & ~rm.exclusion.excluded(tA, entries)]
    t0 = time.perf_counter()
    ev = engine.evaluate_paths(maps, tA, pre, needle, settings, None)
    t_eval = time.perf_counter() - t0
    rate_dm = len(pre) / t_eval
    rate_mesh, mesh_build, n_cells, hit_frac = mesh_baseline(lab_c, synthetic.RISK_LABELS, tA, pre, 3000)
    rows.append(("path evaluation, distance maps (0.5 mm, margins)", f"{rate_dm:,.0f} paths/s",
                 f"{rate_dm / rate_mesh:.1f}x mesh", f"{len(pre)} paths to A in {t_eval:.2f} s, "
                 f"{int(ev.valid.sum())} safe"))
    rows.append(("path evaluation, mesh IntersectWithLine (no margins)", f"{rate_mesh:,.0f} paths/s", "1.0x",
                 f"{n_cells:,} triangles, locator build {mesh_build:.2f} s, {100 * hit_frac:.0f}% of paths hit"))
    rate_dec, dec_build, dec_cells, dec_hit = mesh_baseline(lab_c, synthetic.RISK_LABELS, tA, pre, 3000, decimate=0.9)
    rows.append(("  same, meshes decimated 90 %", f"{rate_dec:,.0f} paths/s",
                 f"DM {rate_dm / rate_dec:.1f}x", f"{dec_cells:,} triangles, build {dec_build:.2f} s, "
                 f"{100 * dec_hit:.0f}% hit"))

    # 3. EDT: scipy vs SimpleITK Maurer (2 threads) on the full grid (largest structure: bone)
    bone = np.asarray(labels.array) == 3
    t_scipy, t_itk, err = edt_compare(bone, ct.spacing[::-1], threads=2)
    rows.append(("EDT full grid, scipy distance_transform_edt", f"{t_scipy:.2f} s", "1.0x", "bone mask"))
    rows.append(("EDT full grid, SimpleITK SignedMaurer (2 threads)", f"{t_itk:.2f} s",
                 f"{t_scipy / t_itk:.1f}x faster", f"max |diff| outside {err:.2e} mm"))

    w = max(len(r[0]) for r in rows)
    print(f"\n{'measurement':<{w}} | {'value':>16} | {'ratio':>14} | notes")
    print("-" * (w + 60))
    for r in rows:
        print(f"{r[0]:<{w}} | {r[1]:>16} | {r[2]:>14} | {r[3]}")
    print(f"\nclearance acceptance bound {res.error_bound_mm:.2f} mm (half voxel diagonal + step/2); "
          f"{len(res.trajectories)} trajectories; shared entry: "
          f"{'yes' if res.shared_entry else 'no'} ({res.shared_entry_note})")


def _crop_of(ct, targets, needle, settings):
    shape = np.array(ct.array.shape)
    pts = np.array([ct.ras_to_ijk_points(np.asarray(t["point_ras"]))[0][::-1] for t in targets])
    pad = np.ceil((needle.max_reach_mm + settings.distance_cap_mm) / ct.spacing[::-1]).astype(int)
    lo = np.maximum(np.floor(pts.min(axis=0)).astype(int) - pad, 0)
    hi = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + pad + 1, shape)
    blo, bhi = engine._rough_body_box(ct, BODY_HU_THRESHOLD)
    return np.maximum(lo, blo), np.minimum(hi, bhi)


if __name__ == "__main__":
    main()

"""Planner benchmark, every figure beside its baseline measured in the same run.

    .venv/bin/python Testing/benchmarks/bench_planner.py [--quick] [--baseline /work/main] [--repeat N] [--mesh]
                                                         [--imports-inside]
    .venv/bin/python Testing/benchmarks/bench_planner.py --screening [--quick] [--repeat N]

``--screening``: only this checkout's exact planner against its pooled screening (``screening="pooled"``), same
CT, alternating: wall and CPU seconds per stage, ratio, and whether every ranked trajectory (entry, score to
1e-6), the shared entry and the shortest safe length are identical.

* full three-target plan on a 512 x 512 x 300 CT (0.8 x 0.8 x 1 mm; ``--quick``: 256 x 256 x 150), one fresh
  process per plan with SimpleITK, edt and scipy.spatial imported before the timing (the application has
  them loaded; ``--imports-inside`` times their first import too): this checkout against the baseline
  checkout (``--baseline``, default: the main checkout next to the worktrees, or ``$SMARTBIOPSY_BASELINE``)
  on the identical synthetic CT, alternating, N times; the ratio of the medians is reported, with each
  stage's time, and the fastest run of each (closest to a quiet machine);
* plan.json's content without its timing fields, which must be identical in every run of both checkouts;
* the best path per target of both (entry, score), which must be identical;
* the CT body mask (SmartBiopsyCoreLib.body, used by fusion, planning and the report) on the whole CT: time
  of both checkouts and whether the masks are voxel-identical;
* CPU seconds (all threads) of the full plan beside the wall-clock seconds: less sensitive to other load;
* distance maps: the ``edt`` package against the SimpleITK fallback, same risk model, same run;
* the independent oracle (``Testing/core/planner_oracle.py``, KD-trees of the label map's voxel boxes, paths
  marched every 0.1 mm) on this checkout's plan: violated margins of every returned path (ranked and shared
  entry); ``--no-oracle`` skips it;
* ``--mesh``: path-evaluation rate of the distance-map engine against a mesh IntersectWithLine baseline.

The machine may be shared: absolute seconds depend on its load; the ratios (same run, alternating) are the
figures to quote.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner")
for _m in MODULES:
    sys.path.insert(0, str(ROOT / _m))

import numpy as np  # noqa: E402

from SmartBiopsyCoreLib.phantom import abdomen as synthetic  # noqa: E402
from TrajectoryPlannerLib.planning import engine  # noqa: E402
from TrajectoryPlannerLib.planning.needles import get_needle  # noqa: E402

# runs in the baseline checkout (and in this one, for the same code path)
PLAN_SCRIPT = r"""
import hashlib, json, sys, time
from SmartBiopsyCoreLib.phantom import abdomen as synthetic
from TrajectoryPlannerLib.planning import engine
spacing, fov, needle, surface, *rest = json.loads(sys.argv[1])
screening = rest[0] if rest else None
if not (len(rest) > 1 and rest[1]):  # the application has these loaded already: their import is not planning
    import SimpleITK, edt, scipy.spatial  # noqa: F401
extra = {"screening": screening} if screening else {}
if surface is not None:
    engine.CLEARANCE_TO_SURFACE = surface
ct, labels, targets = synthetic.make_abdomen(tuple(spacing), tuple(fov))
t0, c0 = time.perf_counter(), time.process_time()
r = engine.plan(ct, targets, needle, labelmaps=[(labels, synthetic.RISK_LABELS)], settings=engine.PlanSettings(threads=2, **extra))
total, cpu = time.perf_counter() - t0, time.process_time() - c0
best = {t.target: {"entry": [round(float(v), 3) for v in t.entry_ras], "score": float(t.score),
                   "min_excess": float(t.min_margin_excess_mm)} for t in r.trajectories if t.rank == 1}
ranked = [[t.target, t.rank, [round(float(v), 3) for v in t.entry_ras], round(float(t.score), 6)] for t in r.trajectories]
shared = None if r.shared_entry is None else [[round(float(v), 3) for v in r.shared_entry.entry_ras],
                                              [round(float(t.score), 6) for t in r.shared_entry.trajectories]]
# plan.json's content without the timing fields
content = {k: v for k, v in r.to_dict().items() if k != "timings_s"}
digest = hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
print("RESULT" + json.dumps({"total": total, "cpu": cpu, "timings": r.timings_s, "best": best, "n": len(r.trajectories),
                             "bound": r.error_bound_mm, "ranked": ranked, "shared": shared,
                             "shortest": r.shortest_safe_length_mm, "plan_sha1": digest}))
"""

# the CT body mask on the whole CT, in either checkout
BODY_SCRIPT = r"""
import hashlib, json, sys, time
import numpy as np
from SmartBiopsyCoreLib.phantom import abdomen as synthetic
from SmartBiopsyCoreLib.body import body_mask_array
from SmartBiopsyCoreLib.geometry import RasVolume
spacing, fov = json.loads(sys.argv[1])
ct, labels, targets = synthetic.make_abdomen(tuple(spacing), tuple(fov))
body_mask_array(RasVolume(np.asarray(ct.array)[:4], ct.ijk_to_ras, 'warm-up'))  # imports outside the timing
t0 = time.perf_counter()
m = body_mask_array(ct, threads=2)
total = time.perf_counter() - t0
print("RESULT" + json.dumps({"total": total, "sha1": hashlib.sha1(np.packbits(m).tobytes()).hexdigest(),
                             "voxels": int(m.sum())}))
"""


IMPORTS_INSIDE = False  # --imports-inside: time the first import of SimpleITK, edt and scipy.spatial too


def run_plan(checkout: Path, spacing, fov, needle, surface=None, screening=None) -> dict:
    return _run(checkout, PLAN_SCRIPT, [spacing, fov, needle, surface, screening, IMPORTS_INSIDE])


def run_body(checkout: Path, spacing, fov) -> dict:
    return _run(checkout, BODY_SCRIPT, [spacing, fov])


def _run(checkout: Path, script: str, args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(checkout / m) for m in MODULES)
    p = subprocess.run([sys.executable, "-c", script, json.dumps(args)],
                       env=env, capture_output=True, text=True, cwd=str(checkout))
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"plan in {checkout} failed:\n{p.stderr[-2000:]}")
    return json.loads(line[-1][6:])


def maps_backends(spacing, fov, needle_name, threads=2) -> tuple[float, float, float]:
    """Seconds of DistanceMaps with edt and with the SimpleITK fallback on one risk model; max |difference|."""
    from TrajectoryPlannerLib.planning import risk

    ct, labels, targets = synthetic.make_abdomen(spacing, fov)
    needle = get_needle(needle_name)
    s = engine.PlanSettings(threads=threads)
    rm = risk.build_risk_model(ct, [(labels, synthetic.RISK_LABELS)], exclusion=risk.EntryExclusion())
    tg = engine._parse_targets(targets)
    entries = engine.oblique_entries(rm, s.entry_spacing_mm)
    domain = engine._path_domain(ct, tg, {t.name: entries for t in tg}, needle, s, rm.exclusion)
    t0 = time.perf_counter()
    a = engine.DistanceMaps(rm, s.distance_cap_mm, threads, 0.0, domain)
    t_edt = time.perf_counter() - t0
    real = engine._edt_module
    engine._edt_module = lambda: None
    try:
        t0 = time.perf_counter()
        b = engine.DistanceMaps(rm, s.distance_cap_mm, threads, 0.0, domain)
        t_itk = time.perf_counter() - t0
    finally:
        engine._edt_module = real
    return t_edt, t_itk, float(np.abs(a.combined - b.combined).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--needle", default="15G/16G-16cm")
    ap.add_argument("--baseline", default=os.environ.get("SMARTBIOPSY_BASELINE", str(ROOT.parents[1] / "main")))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--mesh", action="store_true")
    ap.add_argument("--no-oracle", action="store_true", help="skip the independent oracle check of the plan")
    ap.add_argument("--imports-inside", action="store_true",
                    help="include the first import of SimpleITK, edt and scipy.spatial in the plan's time")
    ap.add_argument("--screening", action="store_true",
                    help="only compare this checkout's exact planner with its pooled screening (same run, alternating)")
    args = ap.parse_args()
    global IMPORTS_INSIDE
    IMPORTS_INSIDE = args.imports_inside
    spacing, fov = ((1.6, 1.6, 2.0), (409.6, 409.6, 300.0)) if args.quick else ((0.8, 0.8, 1.0), (409.6, 409.6, 300.0))
    if args.screening:
        return screening_rows(spacing, fov, args.needle, args.repeat)
    base = Path(args.baseline)
    have_base = (base / "TrajectoryPlanner").is_dir() and base.resolve() != ROOT.resolve()
    print(f"CT {int(fov[0] / spacing[0])} x {int(fov[1] / spacing[1])} x {int(fov[2] / spacing[2])} voxels "
          f"{spacing} mm; needle {args.needle}; cores {os.cpu_count()}; load {os.getloadavg()[0]:.1f}; "
          f"baseline {base if have_base else '(none)'}")
    new, old, body_new, body_old = [], [], [], []
    for _ in range(args.repeat):
        new.append(run_plan(ROOT, spacing, fov, args.needle))
        if have_base:
            old.append(run_plan(base, spacing, fov, args.needle))
        body_new.append(run_body(ROOT, spacing, fov))
        if have_base:
            body_old.append(run_body(base, spacing, fov))
    med = lambda runs, key=None: statistics.median(r["total"] if key is None else r["timings"].get(key, 0.0) for r in runs)  # noqa: E731
    medc = lambda runs: statistics.median(r["cpu"] for r in runs if "cpu" in r) if any("cpu" in r for r in runs) else None  # noqa: E731
    rows = [("full 3-target plan (risk + maps + paths)", med(new), med(old) if old else None)]
    for k in ("risk_structures", "distance_maps", "path_evaluation", "shared_entry"):
        rows.append((f"  {k}", med(new, k), med(old, k) if old else None))
    rows.append(("full 3-target plan, CPU seconds (all threads)", medc(new), medc(old) if old else None))
    rows.append(("full 3-target plan, fastest run (wall)", min(r["total"] for r in new),
                 min(r["total"] for r in old) if old else None))
    rows.append(("full 3-target plan, fastest run (CPU seconds)", min(r["cpu"] for r in new),
                 min(r["cpu"] for r in old) if old else None))
    rows.append(("CT body mask, whole CT", med(body_new), med(body_old) if body_old else None))
    t_edt, t_itk, diff = maps_backends(spacing, fov, args.needle)
    rows.append(("distance maps: edt vs SimpleITK fallback (same model)", t_edt, t_itk))

    w = max(len(r[0]) for r in rows)
    print(f"\n{'measurement':<{w}} | {'this (s)':>9} | {'baseline (s)':>12} | {'ratio':>7}")
    print("-" * (w + 40))
    for name, a, b in rows:
        ratio = f"{b / a:6.2f}x" if b else "   -"
        if a is None:
            continue
        print(f"{name:<{w}} | {a:9.2f} | {b if b is not None else float('nan'):12.2f} | {ratio:>7}")
    print(f"(ratio = baseline / this, medians of {args.repeat} alternating run(s); the last row's baseline is the "
          f"SimpleITK fallback; max |combined field difference| edt vs SimpleITK {diff:.1e} mm; "
          f"load at the end {os.getloadavg()[0]:.1f})")

    if body_old:
        same = body_new[0]["sha1"] == body_old[0]["sha1"]
        print(f"body mask: {body_new[0]['voxels']} voxels; {'voxel-identical' if same else 'DIFFERENT'} to the baseline's")

    print("\nbest path per target (entry RAS mm, score):")
    for t in sorted(new[0]["best"]):
        n = new[0]["best"][t]
        o = old[0]["best"].get(t) if old else None
        same = ("identical" if o and np.allclose(n["entry"], o["entry"]) and abs(n["score"] - o["score"]) < 1e-6
                else "DIFFERENT")
        print(f"  {t}: this {n['entry']} {n['score']:.6f} | baseline {o['entry'] if o else '-'} "
              f"{o['score'] if o else float('nan'):.6f} -> {same if o else '-'}")
    if old and "ranked" in old[0]:
        print(f"all {len(new[0]['ranked'])} ranked trajectories (target, rank, entry, score) identical to the baseline's: "
              f"{new[0]['ranked'] == old[0]['ranked']}")
    if old:
        same = all(r["plan_sha1"] == old[0]["plan_sha1"] for r in new + old)
        print(f"plan.json content without timing fields (every run of both checkouts): "
              f"{'identical' if same else 'DIFFERENT'} (sha1 {new[0]['plan_sha1'][:12]})")

    if not args.no_oracle:
        oracle_rows(spacing, fov, args.needle)
    if args.mesh:
        mesh_rows(spacing, fov, args.needle)


#: planner structure -> phantom label values, stated independently of the planner (automatic gas = bowel gas)
ORACLE_LABELS = {"bone": (3,), "gas": (8,), "aorta": (4,), "ivc": (5,), "kidney": (6,), "bowel": (7,),
                 "bowel_gas": (8,)}


def oracle_rows(spacing, fov, needle_name):
    """This checkout's full-grid plan checked by the independent oracle (Testing/core/planner_oracle.py): every
    returned path (ranked and shared entry), every structure, surface distance - needle radius >= margin."""
    sys.path.insert(0, str(ROOT / "Testing" / "core"))
    from planner_oracle import Oracle

    ct, labels, targets = synthetic.make_abdomen(spacing, fov)
    r = engine.plan(ct, targets, needle_name, labelmaps=[(labels, synthetic.RISK_LABELS)],
                    settings=engine.PlanSettings(threads=2))
    oracle = Oracle(labels, ORACLE_LABELS)
    radius = r.needle.outer_radius_mm
    paths = list(r.trajectories) + (list(r.shared_entry.trajectories) if r.shared_entry else [])
    worst, violations, looser = np.inf, [], []
    for tr in paths:
        for name, dist in oracle.axis_surface_distances(tr.entry_ras, tr.tip_ras).items():
            if name not in tr.margin_mm:
                continue
            slack = dist - radius - tr.margin_mm[name]
            worst = min(worst, slack)
            if slack < -1e-6:
                violations.append((tr.name, name, round(slack, 3)))
            if tr.clearance_mm[name] > dist - radius + 1e-6:
                looser.append((tr.name, name))
    print(f"\noracle (default settings, {len(paths)} returned paths x {len(ORACLE_LABELS)} structures, voxel "
          f"surfaces): {len(violations)} violated margins {violations[:5]}; reported clearance above the oracle's: "
          f"{len(looser)}; smallest slack {worst:.2f} mm")


def screening_rows(spacing, fov, needle_name, repeat):
    """Exact planner against pooled screening + exact re-scoring, this checkout, same CT, alternating."""
    print(f"CT {int(fov[0] / spacing[0])} x {int(fov[1] / spacing[1])} x {int(fov[2] / spacing[2])} voxels {spacing} mm; "
          f"needle {needle_name}; cores {os.cpu_count()}; load {os.getloadavg()[0]:.1f}")
    exact, pooled = [], []
    for _ in range(repeat):
        exact.append(run_plan(ROOT, spacing, fov, needle_name, None, "exact"))
        pooled.append(run_plan(ROOT, spacing, fov, needle_name, None, "pooled"))
    med = lambda runs, key: statistics.median(r[key] if key in ("total", "cpu") else r["timings"].get(key, 0.0) for r in runs)  # noqa: E731
    rows = [("full 3-target plan, wall", "total"), ("full 3-target plan, CPU seconds (all threads)", "cpu"),
            ("  risk_structures", "risk_structures"), ("  distance_maps", "distance_maps"),
            ("  path_evaluation (incl. re-scoring, clearances)", "path_evaluation"), ("  shared_entry", "shared_entry")]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'measurement':<{w}} | {'pooled (s)':>10} | {'exact (s)':>9} | {'exact/pooled':>12}")
    print("-" * (w + 42))
    for name, key in rows:
        a, b = med(pooled, key), med(exact, key)
        print(f"{name:<{w}} | {a:10.2f} | {b:9.2f} | {b / a if a else float('nan'):11.2f}x")
    print(f"(medians of {repeat} alternating run(s) each)")
    e, p = exact[0], pooled[0]
    print(f"ranked trajectories (target, rank, entry, score to 1e-6) identical: {e['ranked'] == p['ranked']} "
          f"({len(e['ranked'])} paths); shared entry identical: {e['shared'] == p['shared']}; "
          f"shortest safe length identical: {e['shortest'] == p['shortest']}")


def mesh_rows(spacing, fov, needle_name):
    """Distance-map path evaluation against straight-line intersection with structure meshes (no margins)."""
    import vtk
    from vtk.util import numpy_support

    from TrajectoryPlannerLib.planning.risk import EntryExclusion, build_risk_model

    ct, labels, targets = synthetic.make_abdomen(spacing, fov)
    needle = get_needle(needle_name)
    s = engine.PlanSettings(threads=2)
    rm = build_risk_model(ct, [(labels, synthetic.RISK_LABELS)], exclusion=EntryExclusion())
    maps = engine.DistanceMaps(rm, s.distance_cap_mm, threads=2)
    entries = engine.oblique_entries(rm, s.entry_spacing_mm)
    tA = np.asarray(targets[0]["point_ras"], float)
    L = np.linalg.norm(entries - tA, axis=1)
    pre = entries[(L <= needle.max_reach_mm) & ~rm.exclusion.excluded(tA, entries)]
    t0 = time.perf_counter()
    engine.evaluate_paths(maps, tA, pre, needle, s, None)
    rate_dm = len(pre) / (time.perf_counter() - t0)
    arr = np.asarray(labels.array)
    locs = []
    for value in synthetic.RISK_LABELS:
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
        tp = vtk.vtkTransformPolyDataFilter()
        tp.SetInputConnection(fe.GetOutputPort())
        tp.SetTransform(tf)
        tp.Update()
        loc = vtk.vtkModifiedBSPTree()
        loc.SetDataSet(tp.GetOutput())
        loc.BuildLocator()
        locs.append(loc)
    pts, ids = vtk.vtkPoints(), vtk.vtkIdList()
    n = min(3000, len(pre))
    t0 = time.perf_counter()
    for e in pre[:n]:
        for loc in locs:
            if loc.IntersectWithLine([float(v) for v in e], [float(v) for v in tA], 1e-3, pts, ids):
                break
    rate_mesh = n / (time.perf_counter() - t0)
    print(f"\npath evaluation: distance maps (margins) {rate_dm:,.0f} paths/s vs mesh IntersectWithLine "
          f"(no margins) {rate_mesh:,.0f} paths/s: {rate_dm / rate_mesh:.1f}x")


if __name__ == "__main__":
    main()

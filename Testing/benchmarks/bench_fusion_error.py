"""Fusion error benchmark: is the predicted 95th-percentile error honest, and which local refinement is best?

On deformed and rigid phantom seeds that no test uses (deformed 100-109, rigid 100-102 by default) it runs
the capsule landmark registration, then each local refinement engine in a box around the tumour, and
prints three tables measured in the same run:

1. engines side by side: wall time and true TRE at the tumour points (mean / max, mm) per seed kind, with
   the landmark result as the baseline row and two oracle rows (the rigid / affine transform fitted to the
   true tumour-point positions: the best any rigid / affine local engine could do);
2. the error model with the default engine: per target (habitat targets A/B/C at the deepest point of the
   true habitat regions), the true error, the predicted 95th percentile, the registration allowance
   (depth - needle error - half notch) and the QA verdict; then coverage on deformed seeds, the ratio
   predicted / true on rigid seeds, and whether QA ever passed a target whose true error exceeds its
   allowance;
3. the mutual information in the tumour box at the landmark pose, at the rigid pose fitted to the truth and at
   the default engine's candidate (does the metric prefer the truth, did the optimiser improve it).

Generated phantoms (about 12 s each) and their capsule detections are cached under
``$SMARTBIOPSY_BENCH_CACHE`` (default /tmp/smartbiopsy_bench_phantoms), so a second run takes a few minutes.

    .venv/bin/python Testing/benchmarks/bench_fusion_error.py [--deformed 100 101] [--rigid 100] [--engines ...]
    .venv/bin/python Testing/benchmarks/bench_fusion_error.py --quick   # deformed 100-101, rigid 100, B-spline

The "bspline" engine registers the Dixon fat image (cached beside each case as ``seed<N>_<kind>_fat.pkl``); the
other engines the T2. The first engine feeds the error model.

Measured, fat-image B-spline engine (2 shared cores under heavy load, 1523 s, ``--engines bspline --rigid 100
102 103 104``; rigid seed 101 is left out because its MRI capsules are not all detected; the whole run is far
beyond the 3-minute budget - ``--quick`` for exploring):

    kind      method                                   seeds  time s  TRE mean  TRE max  accepted  worse
    deformed  landmark (capsules)                         10     0.2      1.47     4.36     10/10   0/10
    deformed  bspline local rigid, candidate (fat)        10    96.2      1.38     4.20      1/10   0/10
    deformed  bspline local rigid, after acceptance       10    96.2      1.47     4.36      1/10   0/10
    deformed  bspline rigid + B-spline (measurement)      10    96.2      1.33     4.09       -     0/10
    deformed  ceiling: best rigid (truth fit)             10     0.0      1.21     3.59       -      -
    deformed  ceiling: best affine (truth fit)            10     0.0      1.03     3.54       -      -
    rigid     landmark (capsules)                          4     0.1      0.21     0.59      4/4    0/4
    rigid     bspline local rigid, candidate (fat)         4   101.8      0.18     0.49      0/4    1/4
    rigid     bspline rigid + B-spline (measurement)       4   101.8      0.24     0.89       -     2/4

    error model as committed (deformation = max(D, M, 1 mm floor, capsule excess)):
      coverage on deformed seeds 29/30 (106 B: 3.06 > 2.51 mm); rigid p95 / true per seed 18.2, 20.5, 6.8, 18.6
      (seeds 100, 102, 103, 104; goal <= 2: NOT met); QA passed no target whose true error exceeds its depth
    rejected rule "no floor when the B-spline is quiet (95th pct over the tumour <= 0.6 mm)":
      coverage 23/30 (77 %: deformed 105 and 109 are quiet, 0.37 / 0.51 mm); rigid per seed 2.0, 2.3, 6.8, 1.7
    the B-spline's 95th percentile over the tumour: deformed 1.75 2.21 1.14 1.34 0.68 0.37 0.87 1.64 0.97 0.51
      (seeds 100-109), rigid 0.23 0.36 0.76 0.42 (100, 102, 103, 104); test seeds: rigid 0 0.80, deformed 2 0.70

Deformable local engine (``Testing/benchmarks/bench_local_deformable.py --spacing-mm 80 --resolutions 2
--iterations 300 --samples 20000``: elastix B-spline via ``itk-elastix``, the Dixon fat image as the FIXED image
cropped to the box and resampled in plane to 3 mm, the CT box moving, AdvancedMattesMutualInformation +
TransformBendingEnergyPenalty 1000, final control spacing 80 mm; 2 shared cores under load, 5 runs of 131-195 s):

    kind      method                                   seeds  time s  TRE mean  TRE max  worse
    deformed  landmark (capsules)                         10     -        1.47     4.36    -
    deformed  elastix B-spline (MRI fixed, fat, 80 mm)    10    63.5      1.31     4.12   1/10
    deformed  ... used only when its p95 > 1.1 mm         10    63.5      1.31     4.12   1/10
    deformed  ceiling: best affine (truth fit)            10     -        1.03     3.54    -
    rigid     landmark (capsules)                          4     -        0.21     0.59    -
    rigid     elastix B-spline (MRI fixed, fat, 80 mm)     4    64.5      0.49     1.37   4/4
    rigid     ... used only when its p95 > 1.1 mm          4    64.5      0.21     0.59   0/4

    per seed, candidate TRE mean: deformed 1.46 0.89 1.51 1.48 1.37 1.27 1.48 1.36 0.97 1.29 (seeds 100-109;
    landmark 1.54 1.61 1.16 1.57 1.36 1.36 1.84 1.69 1.26 1.35), rigid 0.48 0.49 0.59 0.39 (100, 102-104;
    landmark 0.15 0.14 0.41 0.14); Jacobian determinant 0.93-1.04 (no folding)
    its deformation measurement (95th percentile over the tumour of |candidate - landmark|): deformed 2.20 2.08
    1.49 1.23 1.31 1.17 1.20 1.91 1.71 2.12, rigid 1.02 0.77 0.86 0.79 - it separates the 14 seeds (lowest
    deformed 1.17 > highest rigid 1.02 mm, a 0.15 mm margin), where the 2-span SimpleITK measurement above
    overlaps (deformed 105 / 109 at 0.37 / 0.51, rigid 103 at 0.76 mm)

The same engine with 1 level, 50 iterations and 5000 samples costs about 1 s per case for the same accuracy
(80 mm: 1.29 / 0.43 mm deformed / rigid; 60 mm, the benchmark's default: 1.24 / 0.49 mm, p95 deformed 1.25-2.31,
rigid 0.81-0.97 mm), while a B-spline of that spacing fitted to the TRUE displacement leaves 0.10-0.14 mm: the
representation and the cost are not the limit, the image metric is.

The 1.0 mm goal is NOT met: the B-spline recovers a third of the deformation at best (1.47 -> 1.24-1.31 mm, still
above the affine truth fit's 1.03 mm) and moves rigid tumours by 0.4-0.6 mm on metric noise (the fat image is
almost featureless inside the tumour: fat fraction 0-3 % in every tumour compartment). Other settings (control
spacing 40-120 mm, bending 0-1000, CT as the fixed image, SimpleITK full-sample L-BFGS-B, the T2) are in the
docstring of ``bench_local_deformable.py``; none did better on deformed 100 / 101 and all were worse than the
landmark on rigid 100. So no deformable engine is in ``local_refine`` and the workflow keeps the matrix; the
separating measurement (about 1 s per case) needs ``itk-elastix``, which desktop Slicer does not bundle.

Earlier run with the T2 engines (460 s with cached phantoms, ``--elastix-seeds 1``; rigid 100 and 102):

    kind      method                                   seeds  time s  TRE mean  TRE max  accepted  worse
    deformed  simpleitk local rigid, candidate            10    22.7      1.85     5.84      0/10   8/10
    deformed  elastix local rigid, candidate               1    61.9      1.60     3.33      0/1    1/1
    rigid     landmark (capsules)                          2     0.2      0.14     0.23      2/2    0/2
    rigid     simpleitk local rigid, candidate             2    14.9      0.81     1.30      0/2    2/2
    rigid     elastix local rigid, candidate               1    13.7      0.28     0.34      0/1    1/1

    coverage of the predicted 95th percentile on deformed seeds: 29/30 targets (97 %; 106 B: 3.06 > 2.96 mm)
    rigid seeds: p95 / true per target median 21.0, max 34.3; per seed 18.2 (seed 100), 24.3 (seed 102)
    QA passed a target whose true error exceeds its targetable depth: 0 (no target came close: depths 12-18 mm)
    mutation ``refinement_precision_mm = 0``: coverage 25/30 (83 %), rigid p95 / true still 10-34 per target

Why no local engine reaches the 1.0 mm goal (measured on deformed seeds 100-109, rigid 100-102; the table rows
"ceiling: best rigid/affine (truth fit)" and table 3 reproduce the key numbers in every run):

- The deformation is not local to a small box: the phantom tumour spans about 120 x 110 x 170 mm while the
  displacement (2-3 mm amplitude, Gaussian envelope sigma 45 mm, wavelength ~150 mm) varies inside it. Even the
  rigid / affine transform fitted to the TRUE positions of the tumour points leaves, per deformed seed 100-109:
  rigid 1.39 1.26 1.05 1.43 1.19 1.19 1.30 1.11 0.98 1.16 mm (mean 1.21), affine 1.18 0.70 0.90 1.33 1.14 1.15
  1.13 0.74 0.89 1.11 mm (mean 1.03) against the landmark 1.54 1.61 1.16 1.57 1.36 1.36 1.84 1.69 1.26 1.35.
  No rigid or affine engine, however good its optimiser, can reach a 1.0 mm mean.
- The capsules do not see it: the true displacement at the capsules is 0.08-0.18 mm (mean per seed), below
  their localisation error (CT 0.3, MRI 0.5 mm); FRE 0.11-0.22 mm on deformed seeds.
- The mutual information in the default box is not a deformation detector: under deformation it prefers the
  landmark pose to the rigid pose fitted to the truth (table 3: 0.5021 vs 0.4923 nats on seed 100, likewise
  101, 102); on rigid seeds it prefers the truth (0.5224 vs 0.5199), yet the SimpleITK local optimiser ends at a
  LOWER MI than its start (0.5169; candidate 0.46 mm off on rigid seed 100, 1.16 mm on seed 102), so its
  acceptance check rightly refuses it. A Powell optimiser reaches a higher MI (0.5231, above the truth's) at
  0.36 / 0.56 mm from the truth on rigid seeds 100 / 102 (40 s each): the metric optimum itself is 0.3-0.6 mm
  off. Full-sample MI profiles about the true pose on rigid seed 100 peak exactly at the truth in R and A
  (MI range 0.04 nats over +-1 mm) but are flat and biased by 0.5 mm along S (range 0.005 nats): the MRI has
  6 mm slices.
- Low-order deformable trials in the same box (SimpleITK B-spline, LBFGSB, 2-3 control spans per axis,
  Mattes MI, 60 000 samples): deformed 100 1.54 -> 1.76-1.84 mm, deformed 101 1.61 -> 2.18-4.07 mm, rigid 100
  0.15 -> 1.51 mm, 60-120 s each. Translation block matching (40 mm blocks every 30 mm): blocks drift
  5-13 mm on flat MI. elastix's default B-spline map: 7.9 mm (deformed 100), 4.1 mm (rigid 100).
- A per-target MI translation probe (60 mm cube around each target, full-sample MI profile +-2 mm per axis,
  parabolic peak) as a deformation term: rigid seed 100 probes 0.34 / 0.43 / 1.09 mm in plane (true error
  0.12-0.15 mm), deformed seed 100 2.24 / 2.04 / 1.48 mm (true 1.43-2.51 mm). It tracks the deformation but
  its noise on rigid data is 2-8x the true error, so it cannot replace the 1 mm precision floor within the
  2x rigid goal; the floor stays.
- The Dixon fat image is the better contrast: box MI 0.73 vs 0.52 nats for T2 (rigid seed 100), profiles that
  peak at the truth along R, A and S. With a full-sample metric on a 4 mm box and Powell (the gradient-descent
  optimiser ends below its start on the same box), its rigid candidate is 0.13-0.48 mm from the landmark
  result on rigid seeds and 0.07-0.12 mm from the truth on rigid 100/102: precise. A 2-span B-spline on top
  (the table above) lowers the deformed mean TRE to 1.33 mm, not 1.0 mm, and sees only part of the deformation
  (M 0.12-1.80 mm where the true error is 0.29-3.06 mm); a 1-span B-spline misses deformed test seed 2; a
  6 mm box grid makes the B-spline noisy (0.77 mm on rigid 100); per-target translation probes (60 / 90 mm
  cubes) are 0.12-0.7 mm off on rigid seeds. The engine is ``local_engine="bspline"``, not the default: it
  costs 17-162 s per case under heavy load (same run, quieter: 20.5 / 45.0 s on rigid / deformed seed 100
  against 1.8 / 2.4 s for the T2 engine, ``--deformed 100 --rigid 100 --engines bspline simpleitk``) without
  meeting the 1.0 mm or the 2 x goal.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for _m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner"):
    if str(ROOT / _m) not in sys.path:
        sys.path.insert(0, str(ROOT / _m))

CACHE = Path(os.environ.get("SMARTBIOPSY_BENCH_CACHE", "/tmp/smartbiopsy_bench_phantoms"))


def load_case(seed: int, deformation: bool) -> dict:
    """CT, T2, tumour mask, true habitats, capsule detections and the truth of one phantom (cached on disk)."""
    from SmartBiopsyCoreLib.phantom.sarcoma import displacement_from_params

    path = CACHE / f"seed{seed}_{'deformed' if deformation else 'rigid'}.pkl"
    if path.exists():
        with open(path, "rb") as fh:
            d = pickle.load(fh)
    else:
        from RegistrationFusionLib.capsules.detection import detect_capsules
        from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

        case = generate_phantom(seed, deformation=deformation, cache=False)
        t = case.truth
        d = {"seed": seed, "deformation": deformation, "ct": case.ct, "t2": case.mri["t2"],
             "tumour": t.tumour_mask_mri, "habitats": t.mri_habitats, "mri_to_ct": np.array(t.mri_to_ct),
             "displacement": None if t.displacement is None else dict(t.displacement.params),
             "capsules_ct": detect_capsules(case.ct, "ct"), "capsules_mri": detect_capsules(case.mri["t2"], "mr")}
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".tmp"), "wb") as fh:
            pickle.dump(d, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(path.with_suffix(".tmp"), path)
    fat_path = CACHE / f"seed{seed}_{'deformed' if deformation else 'rigid'}_fat.pkl"
    if fat_path.exists():
        with open(fat_path, "rb") as fh:
            d["fat"] = pickle.load(fh)["fat"]
    else:  # the Dixon fat image (same MRI grid and frame as the T2), cached beside the older case files
        from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

        d["fat"] = generate_phantom(seed, deformation=deformation, cache=False).mri["dixon_fat"]
        with open(fat_path.with_suffix(".tmp"), "wb") as fh:
            pickle.dump({"fat": d["fat"]}, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(fat_path.with_suffix(".tmp"), fat_path)
    disp = None if d["displacement"] is None else displacement_from_params(d["displacement"])
    m = d["mri_to_ct"]

    def true_map(x):
        p = np.asarray(x, float).reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
        return p + disp(p) if disp is not None else p

    d["true_map"] = true_map
    return d


def habitat_targets(d: dict) -> list:
    """The A/B/C targets at the deepest point of the true habitat regions (MRI world), with their depths."""
    from SmartBiopsyLib.characterise.targets import plan_targets

    return plan_targets(d["habitats"], None, predicted_tre_mm=0.0)


def fit_to_truth(src: np.ndarray, dst: np.ndarray, rigid: bool) -> np.ndarray:
    """The 4x4 rigid (Kabsch) or affine (least squares) transform that best maps MRI points ``src`` onto their
    true CT positions ``dst``: the ceiling of any rigid/affine local refinement over those points."""
    m = np.eye(4)
    if rigid:
        cs, cd = src.mean(axis=0), dst.mean(axis=0)
        u, _, vt = np.linalg.svd((src - cs).T @ (dst - cd))
        r = vt.T @ np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))]) @ u.T
        m[:3, :3], m[:3, 3] = r, cd - r @ cs
    else:
        x, *_ = np.linalg.lstsq(np.c_[src, np.ones(len(src))], dst, rcond=None)
        m[:3, :] = x.T
    return m


def mi_diagnostic(ct, t2, landmark_m, tumour, truth_rigid_m, candidate_m) -> dict:
    """Mattes MI (nats, same samples) in the default tumour box at the landmark pose, at the rigid pose fitted to
    the truth and at the default engine's candidate: is the metric or the optimiser the problem?"""
    from RegistrationFusionLib.registration.local_refine import _crop, tumour_box_ct
    from RegistrationFusionLib.registration.refine import mutual_information

    lo, hi, _ = tumour_box_ct(tumour, landmark_m, 15.0)
    box = _crop(ct, lo, hi)
    out = {"landmark": landmark_m, "truth rigid": truth_rigid_m, "candidate": candidate_m}
    return {k: (float("nan") if m is None else mutual_information(box, t2, m, bins=32))
            for k, m in out.items()}


def evaluate_seed(d: dict, engines: list[str]) -> dict:
    """Landmark fusion, each local engine and the error model on one cached case."""
    from RegistrationFusionLib.registration import landmarks as L
    from RegistrationFusionLib.registration.error_model import predict_target_errors
    from RegistrationFusionLib.registration.local_refine import (LocalRefinementUnavailable, local_contrast,
                                                                  refine_local)
    from RegistrationFusionLib.registration.pipeline import capsule_tolerance_mm, fuse_ct_mri
    from RegistrationFusionLib.registration.qa import build_report, check_targetable_depth

    ct, t2, tum = d["ct"], d["t2"], d["tumour"]
    pts = tum.voxel_centres_ras(tum.array > 0)[::97]
    truth = d["true_map"](pts)
    t = time.perf_counter()
    fus = fuse_ct_mri(ct, t2, capsules_ct=d["capsules_ct"], capsules_mri=d["capsules_mri"], do_refine=False)
    lm = fus.landmark
    rows = [("landmark (capsules)", time.perf_counter() - t, np.linalg.norm(L.apply_transform(fus.matrix, pts) - truth, axis=1), True)]
    locals_ = {}
    for eng in engines:
        # the B-spline engine registers the contrast the workflow gives it (the Dixon fat image); the rigid
        # engines keep the T2 they were measured on (their rows are the baseline of the fat-image lead)
        mri = local_contrast(d["fat"], t2)[1] if eng == "bspline" else t2
        try:
            r = refine_local(ct, mri, fus.matrix, tum, engine=eng, capsules_mri=lm.moving_points[lm.used],
                             capsules_ct=lm.fixed_points[lm.used],
                             capsule_allowed_mm=capsule_tolerance_mm(lm, factor=2.0, floor_mm=0.5)[lm.used])
        except LocalRefinementUnavailable as exc:
            print(f"  {eng}: {exc}")
            continue
        locals_[eng] = r
        e_c = np.linalg.norm(L.apply_transform(r.candidate_matrix, pts) - truth, axis=1)
        e_u = np.linalg.norm(L.apply_transform(r.matrix, pts) - truth, axis=1)
        rows.append((f"{eng} local rigid, candidate", r.seconds, e_c, r.accepted))
        rows.append((f"{eng} local rigid, after acceptance", r.seconds, e_u, r.accepted))
        if r.deformable is not None:
            e_d = np.linalg.norm(r.map_mri_to_ct_deformable(pts) - truth, axis=1)
            rows.append((f"{eng} rigid + B-spline (measurement)", r.seconds, e_d, r.deformation_detected is not None))
    # what ANY rigid or affine local engine could reach at best: the transform fitted to the truth itself
    for lab, rigid in (("ceiling: best rigid (truth fit)", True), ("ceiling: best affine (truth fit)", False)):
        rows.append((lab, 0.0, np.linalg.norm(L.apply_transform(fit_to_truth(pts, truth, rigid), pts) - truth, axis=1),
                     True))
    mi = mi_diagnostic(ct, t2, fus.matrix, tum, fit_to_truth(pts, truth, True),
                       None if not locals_ else next(iter(locals_.values())).candidate_matrix)
    # error model with the default engine
    targets = habitat_targets(d)
    loc = locals_.get(engines[0]) if engines else None
    used = fus.matrix if loc is None else loc.matrix
    tct = {tg.region: L.apply_transform(used, np.asarray(tg.point_ras)) for tg in targets}
    measured = None if loc is None or loc.deformation_detected is None else \
        loc.deformation_mm(np.array([tct[tg.region] for tg in targets]))
    em = predict_target_errors(lm, tct, refined_matrix=None if loc is None else loc.candidate_matrix,
                               refined_used=bool(loc is not None and loc.accepted), base_matrix=fus.matrix,
                               measured_deformation_mm=measured)
    allow = {tg.region: tg.depth_mm - 2.0 - 5.0 for tg in targets}
    rep = check_targetable_depth(build_report(lm, tct), em, allow)
    trows = []
    for tg in targets:
        true_e = float(np.linalg.norm(tct[tg.region] - d["true_map"](np.asarray(tg.point_ras))[0]))
        failed = any(f"target {tg.region} " in f for f in rep.failures)
        trows.append((tg.region, true_e, em.p95(tg.region), allow[tg.region], not failed))
    raw = [dict(t.to_dict(), true_mm=tr[1], allowance_mm=tr[3]) for t, tr in zip(em.targets, trows)]
    return {"rows": rows, "targets": trows, "raw": raw, "accepted": None if loc is None else bool(loc.accepted),
            "mi": mi, "detected": None if loc is None else loc.deformation_detected,
            "deformation": {} if loc is None else dict(loc.deformation_stats_mm)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deformed", type=int, nargs="*", default=list(range(100, 110)))
    ap.add_argument("--rigid", type=int, nargs="*", default=[100, 101, 102])
    ap.add_argument("--engines", nargs="*", default=["bspline", "simpleitk", "elastix"],
                    help="local engines; the first one feeds the error model (the workflow default: bspline)")
    ap.add_argument("--raw", help="append per-seed raw numbers (JSON lines) to this file")
    ap.add_argument("--elastix-seeds", type=int, default=3, help="run elastix on this many seeds of each kind")
    ap.add_argument("--quick", action="store_true", help="deformed 100-101, rigid 100, B-spline engine only")
    args = ap.parse_args(argv)
    if args.quick:
        args.deformed, args.rigid, args.engines = [100, 101], [100], ["bspline"]
    from SmartBiopsyCoreLib.errors import SmartBiopsyError

    t_all = time.perf_counter()
    results = []
    for kind, seeds in (("deformed", args.deformed), ("rigid", args.rigid)):
        for n, seed in enumerate(seeds):
            d = load_case(seed, kind == "deformed")
            engines = [e for e in args.engines if e != "elastix" or n < args.elastix_seeds]
            try:
                r = evaluate_seed(d, engines)
            except SmartBiopsyError as exc:
                print(f"{kind} seed {seed}: fusion stopped ({exc}); seed left out", flush=True)
                continue
            results.append((kind, seed, r))
            if args.raw:
                with open(args.raw, "a") as fh:
                    fh.write(json.dumps({"kind": kind, "seed": seed, "targets": r["raw"], "accepted": r["accepted"],
                                     "detected": r["detected"], "deformation": r["deformation"],
                                         "rows": [(lab, t, float(e.mean()), float(e.max()), bool(a))
                                                  for lab, t, e, a in r["rows"]]}) + "\n")
            print(f"{kind} seed {seed}: " + "; ".join(f"{lab} {e.mean():.2f}" for lab, _, e, _ in r["rows"])
                  + f"; deformation detected {r['detected']} (p95 {r['deformation'].get('p95', float('nan')):.2f} mm)",
                  flush=True)

    print("\n1. Engines side by side: true TRE at tumour points (mm) and wall time (s), mean over seeds")
    print(f"{'kind':<9} {'method':<40} {'seeds':>5} {'time s':>7} {'TRE mean':>9} {'TRE max':>8} {'accepted':>9} "
          f"{'worse than landmark':>20}")
    for kind in ("deformed", "rigid"):
        sub = [r for k, _, r in results if k == kind]
        labels = []
        for r in sub:
            labels += [lab for lab, *_ in r["rows"] if lab not in labels]
        for lab in labels:
            vals = [(row, r["rows"][0][2]) for r in sub for row in r["rows"] if row[0] == lab]
            if not vals:
                continue
            tm = np.mean([v[0][1] for v in vals])
            mean = np.mean([v[0][2].mean() for v in vals])
            mx = np.max([v[0][2].max() for v in vals])
            acc = sum(bool(v[0][3]) for v in vals)
            worse = sum(v[0][2].mean() > v[1].mean() + 0.05 for v in vals)
            print(f"{kind:<9} {lab:<40} {len(vals):>5} {tm:7.1f} {mean:9.2f} {mx:8.2f} {acc:>5}/{len(vals):<3} "
                  f"{worse:>16}/{len(vals)}")

    print("\n2. Error model per target (default engine): true error, predicted 95th percentile, targetable depth "
          "(depth - 2 mm needle - 5 mm half notch), QA")
    print(f"{'kind':<9} {'seed':>4} {'target':>6} {'true mm':>8} {'p95 mm':>7} {'covered':>8} {'p95/true':>9} "
          f"{'allow mm':>9} {'QA':>5}")
    for kind, seed, r in results:
        for reg, te, p95, allow, ok in r["targets"]:
            print(f"{kind:<9} {seed:>4} {reg:>6} {te:8.2f} {p95:7.2f} {'yes' if p95 >= te else 'NO':>8} "
                  f"{p95 / max(te, 1e-6):9.1f} {allow:9.1f} {'pass' if ok else 'FAIL':>5}")
    dt = [t for k, _, r in results if k == "deformed" for t in r["targets"]]
    rt = [t for k, _, r in results if k == "rigid" for t in r["targets"]]
    allt = dt + rt
    if dt:
        cov = np.mean([p >= te for _, te, p, _, _ in dt])
        print(f"\ncoverage on deformed seeds: {100 * cov:.0f} % of {len(dt)} targets (goal >= 90 %)")
    if rt:
        ratio = np.array([p / max(te, 1e-6) for _, te, p, _, _ in rt])
        seed_ratio = [np.mean([p for _, _, p, _, _ in r["targets"]]) / np.mean([te for _, te, _, _, _ in r["targets"]])
                      for k, _, r in results if k == "rigid"]
        print(f"rigid seeds: predicted p95 / true error per target median {np.median(ratio):.1f}, max {ratio.max():.1f}; "
              f"per seed (mean p95 / mean true) {', '.join(f'{v:.1f}' for v in seed_ratio)} (goal <= 2)")
    # the rejected alternative: no precision floor (and no rigid-candidate disagreement) when a valid deformable
    # measurement is quiet - what it would give on the same cases
    from RegistrationFusionLib.registration.error_model import CHI3_95, ErrorModelParameters

    k = ErrorModelParameters().deformation_factor
    cov_b, rat_b = [], []
    for kind, _, r in results:
        if r["detected"] is None:
            continue
        for t in r["raw"]:
            d = t["deformation_mm"] if r["detected"] else t["capsule_excess_mm"]
            p = float(np.hypot(CHI3_95 * t["rigid_tre_rms_mm"], k * d))
            (cov_b if kind == "deformed" else rat_b).append(p >= t["true_mm"] if kind == "deformed"
                                                            else p / max(t["true_mm"], 1e-6))
    if cov_b or rat_b:
        print(f"rejected rule 'no floor when the B-spline is quiet': deformed coverage {sum(cov_b)}/{len(cov_b)}"
              + (f"; rigid p95 / true per target median {np.median(rat_b):.1f}, max {max(rat_b):.1f}" if rat_b else ""))
    bad = [(te, a, ok) for _, te, _, a, ok in allt if te > a and ok]
    print(f"QA passed a target whose true error exceeds its targetable depth: {len(bad)} times (goal 0); "
          f"targets with true error > targetable depth: {sum(te > a for _, te, _, a, _ in allt)}")
    print("\n3. Mutual information in the tumour box (nats, same samples): landmark pose, rigid pose fitted to the truth, "
          "default engine's candidate")
    print(f"{'kind':<9} {'seed':>4} {'landmark':>9} {'truth rigid':>12} {'candidate':>10}  metric prefers truth  "
          f"optimiser improved MI")
    for kind, seed, r in results:
        m = r["mi"]
        print(f"{kind:<9} {seed:>4} {m['landmark']:9.4f} {m['truth rigid']:12.4f} {m['candidate']:10.4f}  "
              f"{'yes' if m['truth rigid'] > m['landmark'] else 'no':>20}  "
              f"{'yes' if m['candidate'] > m['landmark'] else 'no':>20}")
    print(f"total benchmark time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

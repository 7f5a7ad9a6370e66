"""Capsule detection benchmark: 10 phantom seeds (detection, false positives, localisation error CT/MRI,
MRI per-axis error, pairing and landmark TRE vs predicted TRE) and speed on a 512 x 512 x 300 CT against a
plain SimpleITK pipeline (threshold, ball opening, components, centroids), measured side by side.

Run: .venv/bin/python Testing/benchmarks/bench_capsules.py [--seeds 10]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner"):
    sys.path.insert(0, str(ROOT / m))

from RegistrationFusionLib.capsules.detection import detect_capsules  # noqa: E402
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid, resample  # noqa: E402


def match(found, truth, gate=3.0):
    d = np.linalg.norm(found[:, None] - truth[None], axis=2)
    nn, ok = d.argmin(axis=1), d.min(axis=1) <= gate
    return found[ok] - truth[nn[ok]], len(truth) - len(set(nn[ok].tolist())), int((~ok).sum())


def sitk_baseline(vol: RasVolume, radius_mm=6.0):
    """Plain SimpleITK: threshold -500 HU, ball opening, top-hat components 35-700 mm^3, centroids."""
    import SimpleITK as sitk

    img = vol.to_sitk()
    fg = sitk.BinaryThreshold(img, -500, 1e6, 1, 0)
    r = [max(1, int(round(radius_mm / s))) for s in img.GetSpacing()]
    opened = sitk.BinaryMorphologicalOpening(fg, r, sitk.sitkBall)
    th = sitk.And(fg, sitk.Not(opened))
    cc = sitk.ConnectedComponent(th)
    st = sitk.LabelShapeStatisticsImageFilter()
    st.Execute(cc)
    pts = [st.GetCentroid(lab) for lab in st.GetLabels() if 35 <= st.GetPhysicalSize(lab) <= 700]
    return np.array([[-p[0], -p[1], p[2]] for p in pts]).reshape(-1, 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    from RegistrationFusionLib.registration.landmarks import register_capsules
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

    rows, errs, tre_m, tre_p = [], {"ct": [], "mr": []}, [], []
    big = None
    print(f"{'seed':>4} {'mod':>3} {'truth':>5} {'found':>5} {'miss':>4} {'FP':>3} {'mean mm':>8} {'max mm':>7} {'time s':>7}")
    for seed in range(args.seeds):
        case = generate_phantom(seed)
        dets = {}
        for mod, vol, truth in (("ct", case.ct, case.truth.capsules_ct), ("mr", case.mri["t2"], case.truth.capsules_mri)):
            t = time.perf_counter()
            det = detect_capsules(vol, mod)
            dt = time.perf_counter() - t
            e, miss, fp = match(det.centres_ras, truth)
            errs[mod].append(e)
            dets[mod] = det
            rows.append((mod, len(truth), miss, fp))
            d = np.linalg.norm(e, axis=1)
            print(f"{seed:>4} {mod:>3} {len(truth):>5} {len(det):>5} {miss:>4} {fp:>3} {d.mean():8.3f} {d.max():7.3f} {dt:7.2f}")
        corr, reg = register_capsules(dets["ct"].centres_ras, dets["mr"].centres_ras,
                                      fle_ct=dets["ct"].fle_cov_ras, fle_mri=dets["mr"].fle_cov_ras)
        tr = case.truth
        pts = tr.tumour_mask_mri.voxel_centres_ras(tr.tumour_mask_mri.array > 0)[::97]
        true_ct = pts @ tr.mri_to_ct[:3, :3].T + tr.mri_to_ct[:3, 3]
        tre = np.linalg.norm(reg.transform_points(pts) - true_ct, axis=1)
        pred = reg.predicted_tre(true_ct)
        tre_m.append(np.mean(tre ** 2)); tre_p.append(np.mean(pred ** 2))
        print(f"     pairs {len(corr.pairs)}/{len(tr.capsules_ct)}  TRE mean {tre.mean():.3f} mm  predicted RMS "
              f"{np.sqrt(np.mean(pred ** 2)):.3f} mm  FRE {reg.fre_mm:.3f} mm")
        if big is None:
            big = case
    print()
    for mod in ("ct", "mr"):
        e = np.concatenate(errs[mod]); d = np.linalg.norm(e, axis=1)
        n = sum(r[1] for r in rows if r[0] == mod); miss = sum(r[2] for r in rows if r[0] == mod)
        fp = sum(r[3] for r in rows if r[0] == mod)
        print(f"{mod}: detected {n - miss}/{n} ({100 * (n - miss) / n:.1f} %), FP {fp}, error mean {d.mean():.3f} mm, "
              f"max {d.max():.3f} mm, RMS per axis R/A/S {np.round(np.sqrt((e ** 2).mean(axis=0)), 3)} mm")
    print(f"TRE at tumour points: measured RMS {np.sqrt(np.mean(tre_m)):.3f} mm, predicted RMS "
          f"{np.sqrt(np.mean(tre_p)):.3f} mm, ratio {np.sqrt(np.mean(tre_p) / np.mean(tre_m)):.2f}")

    # speed on a 512 x 512 x 300 CT (the seed-0 CT resampled to 0.78 x 0.78 x 0.74 mm)
    ct = big.ct
    sp = (400.0 / 512, 400.0 / 512, 222.0 / 300)
    origin = ct.origin_ras.copy(); origin[1] -= 56.0
    ref = RasVolume(np.zeros((300, 512, 512), np.int16), make_grid(origin, sp, (300, 512, 512)), "ref")
    hr = resample(ct, ref, order=1, fill=-1000.0)
    hr = hr.with_array(hr.array.astype(np.int16), name="CT 512x512x300")
    t = time.perf_counter(); det = detect_capsules(hr, "ct"); t_ours = time.perf_counter() - t
    e_ours, miss_o, fp_o = match(det.centres_ras, big.truth.capsules_ct)
    t = time.perf_counter(); base = sitk_baseline(hr); t_base = time.perf_counter() - t
    e_base, miss_b, fp_b = match(base, big.truth.capsules_ct) if len(base) else (np.zeros((0, 3)), 8, 0)
    print()
    print(f"{'512x512x300 CT':<28} {'time s':>7} {'found':>5} {'miss':>4} {'FP':>3} {'mean err mm':>11}")
    print(f"{'detect_capsules':<28} {t_ours:7.2f} {len(det):>5} {miss_o:>4} {fp_o:>3} {np.linalg.norm(e_ours, axis=1).mean():11.3f}")
    print(f"{'SimpleITK threshold+opening':<28} {t_base:7.2f} {len(base):>5} {miss_b:>4} {fp_b:>3} "
          f"{(np.linalg.norm(e_base, axis=1).mean() if len(e_base) else float('nan')):11.3f}")
    print(f"speed ratio baseline/ours: {t_base / t_ours:.2f}")


if __name__ == "__main__":
    main()

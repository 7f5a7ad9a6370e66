"""Capsule detection benchmark: 10 phantom seeds (detection, false positives, localisation error CT/MRI,
MRI per-axis error, pairing and landmark TRE vs predicted TRE) and speed on a 512 x 512 x 300 CT against a
plain SimpleITK pipeline (threshold, ball opening, components, centroids), measured side by side.

Fine pixels (``--fine``): a 409 x 512 x 512 CT with 0.39 mm pixels (0.5 mm slices) made from the seed-0
phantom, detected by today's code and by the code of ``--old-ref`` (a git revision, loaded from git
history) side by side, each in its own process on the same saved volume: wall time, peak resident
memory (VmHWM of the process, input volume and imports included) and the tracemalloc peak of the detection call.

Run: .venv/bin/python Testing/benchmarks/bench_capsules.py [--seeds 10] [--fine [--old-ref e98f41e] [--skip-seeds]]
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


OLD_REF = "e98f41e"  # the last revision before detection worked on the detection grid from the start
DETECTION_PATH = "RegistrationFusion/RegistrationFusionLib/capsules/detection.py"


def load_detection(ref: str | None):
    """``detect_capsules`` of today's tree (ref None) or of git revision ``ref`` (module loaded from history)."""
    if ref is None:
        return detect_capsules
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{DETECTION_PATH}"], capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"detection_{ref}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"detection_{ref}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.detect_capsules


def child(which: str, npz: str, ref: str) -> None:
    """Run one detection on the saved CT in this (fresh) process and print one JSON line."""
    import json
    import tracemalloc

    def hwm_mb(key="VmHWM"):  # this process's peak resident memory (ru_maxrss would include the parent's before exec)
        for ln in Path("/proc/self/status").read_text().splitlines():
            if ln.startswith(key + ":"):
                return float(ln.split()[1]) / 1024.0
        return float("nan")

    det_fn = load_detection(None if which == "new" else ref)
    d = np.load(npz)
    vol = RasVolume(d["array"], d["ijk_to_ras"], "CT 409x512x512 0.39 mm")
    truth = d["truth"]
    rss0 = hwm_mb("VmRSS")
    tracemalloc.start()
    t = time.perf_counter()
    det = det_fn(vol, "ct")
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    e, miss, fp = match(det.centres_ras, truth)
    print(json.dumps({"which": which, "seconds": dt, "maxrss_mb": hwm_mb(),
                      "rss_before_mb": rss0, "tracemalloc_peak_mb": peak / 2 ** 20, "found": len(det), "miss": miss,
                      "fp": fp, "mean_err_mm": float(np.linalg.norm(e, axis=1).mean()) if len(e) else float("nan")}))


def fine_pixel_benchmark(ref: str, timeout_s: float) -> None:
    import json
    import subprocess
    import tempfile

    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

    case = generate_phantom(0)
    truth = np.asarray(case.truth.capsules_ct)
    shape = (409, 512, 512)
    sp = (0.39, 0.39, 0.5)
    centre = truth.mean(axis=0)
    origin = centre - (np.array(shape[::-1]) - 1) / 2 * np.array(sp)
    ref_vol = RasVolume(np.zeros(shape, np.int16), make_grid(origin, sp, shape), "ref")
    t = time.perf_counter()
    hr = resample(case.ct, ref_vol, order=1, fill=-1000.0)
    arr = np.round(hr.array).astype(np.int16)
    del hr
    inside = truth[np.all(np.abs(truth - centre) < (np.array(shape[::-1]) * sp) / 2 - 8.0, axis=1)]
    npz = Path(tempfile.mkdtemp()) / "fine_ct.npz"
    np.savez(npz, array=arr, ijk_to_ras=ref_vol.ijk_to_ras, truth=inside)
    print(f"\nfine-pixel CT {shape[::-1]} voxels, {sp} mm, {arr.nbytes / 2 ** 20:.0f} MB int16, {len(inside)} capsules "
          f"inside the field of view (made in {time.perf_counter() - t:.0f} s)")
    del arr
    print(f"{'code':<16} {'time s':>7} {'peak RSS MB':>11} {'RSS before MB':>13} {'tracemalloc MB':>14} {'found':>5} "
          f"{'miss':>4} {'FP':>3} {'mean err mm':>11}")
    for which in ("new", "old"):
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", which, str(npz), "--old-ref", ref],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"{which + ' (' + (ref if which == 'old' else 'HEAD') + ')':<16} > {timeout_s:.0f} s (stopped)")
            continue
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not line:
            print(f"{which}: failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(line[-1])
        print(f"{which + ' (' + (ref if which == 'old' else 'HEAD') + ')':<16} {r['seconds']:7.1f} {r['maxrss_mb']:11.0f} "
              f"{r['rss_before_mb']:13.0f} {r['tracemalloc_peak_mb']:14.0f} {r['found']:>5} {r['miss']:>4} {r['fp']:>3} "
              f"{r['mean_err_mm']:11.3f}")
    npz.unlink()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--fine", action="store_true", help="also the 409x512x512 0.39 mm CT, old vs new")
    ap.add_argument("--skip-seeds", action="store_true", help="only the fine-pixel comparison")
    ap.add_argument("--old-ref", default=OLD_REF, help="git revision of the old detection code")
    ap.add_argument("--old-timeout", type=float, default=150.0, help="stop the old code after this many seconds")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.old_ref)
    if args.skip_seeds:
        return fine_pixel_benchmark(args.old_ref, args.old_timeout)
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
    if args.fine:
        fine_pixel_benchmark(args.old_ref, args.old_timeout)


if __name__ == "__main__":
    main()

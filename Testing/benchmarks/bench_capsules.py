"""Capsule detection benchmark: 10 phantom seeds (detection, false positives, localisation error CT/MRI,
MRI per-axis error, pairing and landmark TRE vs predicted TRE) and speed on a 512 x 512 x 300 CT against a
plain SimpleITK pipeline (threshold, ball opening, components, centroids), measured side by side.

Fine pixels (``--fine``): a 409 x 512 x 512 CT with 0.39 mm pixels (0.5 mm slices) made from the seed-0
phantom, detected by today's code and by the code of ``--old-ref`` (a git revision, loaded from git
history) side by side, each in its own process on the same saved volume: wall time, peak resident
memory (VmHWM of the process, input volume and imports included) and the tracemalloc peak of the detection call.

Old against new: every seed and the 512 x 512 x 300 CT are detected by today's code and by the code of ``--base-ref``
(loaded from git history) in the same run; the table shows both and the speed ratio.

Run: .venv/bin/python Testing/benchmarks/bench_capsules.py [--seeds 10] [--repeats 3] [--base-ref 48ff274]
     [--fine [--old-ref e98f41e] [--skip-seeds]]
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


BASE_REF = "48ff274"  # the detection code before the band/one-labelling/cropped-opening speed-up (issue 18)


def ct_512(case) -> RasVolume:
    """The case's CT resampled to 512 x 512 x 300 voxels (0.78 x 0.78 x 0.74 mm), int16 HU."""
    ct = case.ct
    sp = (400.0 / 512, 400.0 / 512, 222.0 / 300)
    origin = ct.origin_ras.copy(); origin[1] -= 56.0
    ref = RasVolume(np.zeros((300, 512, 512), np.int16), make_grid(origin, sp, (300, 512, 512)), "ref")
    hr = resample(ct, ref, order=1, fill=-1000.0)
    return hr.with_array(np.round(hr.array).astype(np.int16), name="CT 512x512x300")


CPU_S: list = []  # CPU seconds (this process, every thread) of each timed() call, in order


def timed(fn, *a):
    t, c = time.perf_counter(), time.process_time()
    r = fn(*a)
    CPU_S.append(time.process_time() - c)
    return r, time.perf_counter() - t


def position_shift(a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance (mm) from a capsule of ``a`` to the nearest of ``b`` (inf when the counts differ)."""
    if len(a) != len(b):
        return float("inf")
    if not len(a):
        return 0.0
    return float(np.linalg.norm(a[:, None] - b[None], axis=2).min(axis=1).max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each detector on the 512 x 512 x 300 CT")
    ap.add_argument("--sitk", action="store_true", help="also the plain SimpleITK pipeline on the 512 CT (slow)")
    ap.add_argument("--base-ref", default=BASE_REF, help="git revision of the baseline detector (old)")
    ap.add_argument("--fine", action="store_true", help="also the 409x512x512 0.39 mm CT, old vs new")
    ap.add_argument("--skip-seeds", action="store_true", help="only the fine-pixel comparison")
    ap.add_argument("--old-ref", default=OLD_REF, help="git revision of the old detection code (--fine)")
    ap.add_argument("--old-timeout", type=float, default=150.0, help="stop the old code after this many seconds")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.old_ref)
    if args.skip_seeds:
        return fine_pixel_benchmark(args.old_ref, args.old_timeout)
    import os

    from RegistrationFusionLib.registration.landmarks import register_capsules
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

    old_detect = load_detection(args.base_ref)
    print(f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}; old = {args.base_ref}, new = this checkout")
    rows, errs, tre_m, tre_p = [], {"ct": [], "mr": [], "ct_old": [], "mr_old": []}, [], []
    shifts = {"ct": [], "mr": []}
    big = None
    print(f"{'seed':>4} {'mod':>3} {'truth':>5} | {'found':>5} {'miss':>4} {'FP':>3} {'mean mm':>8} {'max mm':>7} "
          f"{'time s':>7} | {'old found':>9} {'miss':>4} {'FP':>3} {'mean mm':>8} {'time s':>7} | {'new-old mm':>10}")
    for seed in range(args.seeds):
        case = generate_phantom(seed, disk_cache=True)
        dets = {}
        for mod, vol, truth in (("ct", case.ct, case.truth.capsules_ct), ("mr", case.mri["t2"], case.truth.capsules_mri)):
            det, dt = timed(detect_capsules, vol, mod)
            old, dt_old = timed(old_detect, vol, mod)
            e, miss, fp = match(det.centres_ras, truth)
            eo, miss_o, fp_o = match(old.centres_ras, truth)
            errs[mod].append(e)
            errs[mod + "_old"].append(eo)
            dets[mod] = det
            sh = position_shift(det.centres_ras, old.centres_ras)
            shifts[mod].append(sh)
            rows.append((mod, len(truth), miss, fp, miss_o, fp_o, dt, dt_old))
            d, do = np.linalg.norm(e, axis=1), np.linalg.norm(eo, axis=1)
            print(f"{seed:>4} {mod:>3} {len(truth):>5} | {len(det):>5} {miss:>4} {fp:>3} {d.mean():8.3f} {d.max():7.3f} "
                  f"{dt:7.2f} | {len(old):>9} {miss_o:>4} {fp_o:>3} {do.mean():8.3f} {dt_old:7.2f} | {sh:10.4f}")
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
    print(f"{'ten seeds':<10} {'code':<4} {'detected':>12} {'FP':>3} {'mean err mm':>11} {'max err mm':>10} "
          f"{'RMS R/A/S mm':>22} {'time s':>7}")
    for mod in ("ct", "mr"):
        n = sum(r[1] for r in rows if r[0] == mod)
        for which, (mi, fi, ti) in (("new", (2, 3, 6)), ("old", (4, 5, 7))):
            e = np.concatenate(errs[mod if which == "new" else mod + "_old"]); d = np.linalg.norm(e, axis=1)
            miss = sum(r[mi] for r in rows if r[0] == mod); fp = sum(r[fi] for r in rows if r[0] == mod)
            tt = sum(r[ti] for r in rows if r[0] == mod)
            rms = np.round(np.sqrt((e ** 2).mean(axis=0)), 3)
            print(f"{mod:<10} {which:<4} {f'{n - miss}/{n}':>12} {fp:>3} {d.mean():11.3f} {d.max():10.3f} "
                  f"{str(rms.tolist()):>22} {tt:7.2f}")
        print(f"{mod:<10} largest new-old capsule position difference {max(shifts[mod]):.4f} mm")
    print(f"TRE at tumour points (new): measured RMS {np.sqrt(np.mean(tre_m)):.3f} mm, predicted RMS "
          f"{np.sqrt(np.mean(tre_p)):.3f} mm, ratio {np.sqrt(np.mean(tre_p) / np.mean(tre_m)):.2f}")

    # speed on a 512 x 512 x 300 CT (the seed-0 CT resampled to 0.78 x 0.78 x 0.74 mm), old and new interleaved
    hr = ct_512(big)
    truth = big.truth.capsules_ct
    t_new, t_old, c_new, c_old = [], [], [], []
    for _ in range(max(1, args.repeats)):
        det, dt = timed(detect_capsules, hr, "ct"); t_new.append(dt); c_new.append(CPU_S[-1])
        old, dt = timed(old_detect, hr, "ct"); t_old.append(dt); c_old.append(CPU_S[-1])
    base, t_base = timed(sitk_baseline, hr) if args.sitk else (None, float("nan"))
    e_new, miss_n, fp_n = match(det.centres_ras, truth)
    e_old, miss_o, fp_o = match(old.centres_ras, truth)
    e_base, miss_b, fp_b = match(base, truth) if base is not None and len(base) else (np.zeros((0, 3)), len(truth), 0)
    print()
    print(f"512x512x300 CT, {args.repeats} interleaved runs each (load {os.getloadavg()[0]:.1f})")
    print(f"{'detector':<34} {'best s':>7} {'median s':>8} {'best CPU s':>10} {'found':>5} {'miss':>4} {'FP':>3} "
          f"{'mean err mm':>11}")
    table = [("detect_capsules (new)", t_new, c_new, det.centres_ras, e_new, miss_n, fp_n),
             (f"detect_capsules (old {args.base_ref})", t_old, c_old, old.centres_ras, e_old, miss_o, fp_o)]
    if base is not None:
        table.append(("SimpleITK threshold+opening", [t_base], [CPU_S[-1]], base, e_base, miss_b, fp_b))
    for name, ts, cs, d, e, mi, fp in table:
        err = np.linalg.norm(e, axis=1).mean() if len(e) else float("nan")
        print(f"{name:<34} {min(ts):7.2f} {float(np.median(ts)):8.2f} {min(cs):10.2f} {len(d):>5} {mi:>4} {fp:>3} "
              f"{err:11.3f}")
    print(f"speed ratio old/new: best {min(t_old) / min(t_new):.2f}x, median {np.median(t_old) / np.median(t_new):.2f}x, "
          f"CPU {min(c_old) / min(c_new):.2f}x; largest new-old position difference "
          f"{position_shift(det.centres_ras, old.centres_ras):.4f} mm")
    if args.fine:
        fine_pixel_benchmark(args.old_ref, args.old_timeout)


if __name__ == "__main__":
    main()

"""Registration benchmark on the digital phantom: landmark vs MI refinement (SimpleITK) vs elastix rigid.

Prints one table measured side by side in one run: wall time and TRE at tumour points (mean / max, mm,
against the phantom's true MRI->CT pose). Refinements start from the landmark solution perturbed by
2 degrees / 3 mm so that they have something to recover. elastix (itk-elastix, default "rigid" parameter
map, automatic initialisation off) is included when the package is installed.

    .venv/bin/python Testing/benchmarks/bench_registration.py [--seeds 0 1]
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

from RegistrationFusionLib.registration import landmarks as L  # noqa: E402
from RegistrationFusionLib.registration import refine as R  # noqa: E402
from SmartBiopsyCoreLib.geometry import RasVolume, lps_to_ras_matrix  # noqa: E402
from RegistrationFusionLib.registration.pipeline import body_mask_ct, fuse_ct_mri  # noqa: E402


def perturbation() -> np.ndarray:
    a = np.radians(2.0)
    m = np.eye(4)
    m[:3, :3] = [[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]]
    m[:3, 3] = [3.0, 0.0, -1.0]
    return m


def tre(matrix, truth, pts):
    d = np.asarray(matrix) @ np.linalg.inv(truth)
    e = np.linalg.norm(L.apply_transform(d, pts) - pts, axis=1)
    return float(e.mean()), float(e.max())


def elastix_rigid(ct: RasVolume, mri: RasVolume, start: np.ndarray):
    """elastix default rigid map from ``start`` (applied exactly by moving the MRI header); MRI->CT 4x4 RAS."""
    import itk
    import SimpleITK as sitk

    moved = RasVolume(mri.array.astype(np.float32), start @ mri.ijk_to_ras, mri.name)

    def to_itk(vol):
        s = vol.to_sitk()
        img = itk.image_from_array(np.ascontiguousarray(vol.array.astype(np.float32)))
        img.SetOrigin(s.GetOrigin())
        img.SetSpacing(s.GetSpacing())
        img.SetDirection(itk.matrix_from_array(np.array(s.GetDirection()).reshape(3, 3)))
        return img

    po = itk.ParameterObject.New()
    pm = po.GetDefaultParameterMap("rigid")
    pm["AutomaticTransformInitialization"] = ["false"]
    po.AddParameterMap(pm)
    _, tpo = itk.elastix_registration_method(to_itk(ct.with_array(ct.array.astype(np.float32))), to_itk(moved),
                                             parameter_object=po, log_to_console=False)
    p = [float(v) for v in tpo.GetParameter(0, "TransformParameters")]
    c = [float(v) for v in tpo.GetParameter(0, "CenterOfRotationPoint")]
    e = sitk.Euler3DTransform()
    e.SetCenter(c)
    e.SetRotation(*p[:3])
    e.SetTranslation(p[3:6])
    return R.ras_from_itk(e) @ start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

    try:
        import itk  # noqa: F401
        have_elastix = hasattr(itk, "elastix_registration_method")
    except ImportError:
        have_elastix = False

    rows = []
    for seed in args.seeds:
        case = generate_phantom(seed)
        truth = case.truth.mri_to_ct
        pts = case.ct.voxel_centres_ras(case.ct_labels.array == 9)[::50]
        ct, t2 = case.ct, case.mri["t2"]
        t = time.perf_counter()
        fus = fuse_ct_mri(ct, t2, do_refine=False)
        rows.append((seed, "capsules + landmark (detection incl.)", time.perf_counter() - t, *tre(fus.matrix, truth, pts)))
        start = fus.landmark.matrix @ perturbation()
        rows.append((seed, "perturbed start (2 deg / 3 mm)", 0.0, *tre(start, truth, pts)))
        mask = body_mask_ct(ct)
        for label, opts in (("SimpleITK MI rigid (project defaults)", {}),
                            ("SimpleITK MI rigid (shrink 4,2; 60 it)", dict(shrink=(4, 2), smoothing_mm=(2.0, 1.0), iterations=60))):
            t = time.perf_counter()
            out = R.refine_registration(ct, t2, start, ct_mask=mask, **opts)
            rows.append((seed, label, time.perf_counter() - t, *tre(out.candidate_matrix, truth, pts)))
        if have_elastix:
            t = time.perf_counter()
            m = elastix_rigid(ct, t2, start)
            rows.append((seed, "elastix default rigid map", time.perf_counter() - t, *tre(m, truth, pts)))
    print(f"{'seed':>4}  {'method':<42} {'time s':>8} {'TRE mean mm':>12} {'TRE max mm':>11}")
    for seed, label, dt, mean, mx in rows:
        print(f"{seed:>4}  {label:<42} {dt:8.2f} {mean:12.3f} {mx:11.3f}")
    if not have_elastix:
        print("(elastix row missing: pip install itk-elastix to include it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

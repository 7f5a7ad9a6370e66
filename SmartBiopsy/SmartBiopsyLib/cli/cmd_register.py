"""``smartbiopsy register --ct CT --mri MRI --out DIR [--no-capsules]``: MRI->CT registration with QA.

Capsule-based; with ``--no-capsules``, or automatically when fewer than three capsule pairs exist, a
capsule-free (intensity-only) fusion that is accepted only when unambiguous (else the command stops with
the reason and writes no transform).

Writes into DIR: ``mri_to_ct.tfm`` and ``mri_to_ct.h5`` (ITK, LPS, fixed=CT -> moving=MRI as ITK and Slicer
store a transform placed on the MRI), ``transform.json`` (the 4x4 RAS matrix mapping MRI points to CT
points), ``mri_on_ct.nrrd`` (MRI resampled on the CT grid), ``qa.json``, ``registration.json`` (every
intermediate result) and ``fusion_checkerboard.png`` / ``fusion_overlay.png``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from SmartBiopsyCoreLib.dataio import jsonio


def register(subparsers) -> None:
    p = subparsers.add_parser("register", help="register an MRI to the planning CT through the skin capsules",
                              description="Find the skin capsules in both images, pair them, register MRI to CT "
                                          "(landmarks, then mutual-information refinement) and write the transform, "
                                          "the resampled MRI and a QA report.")
    p.add_argument("--ct", required=True, help="planning CT: DICOM folder or volume file (NRRD/NIfTI)")
    p.add_argument("--mri", required=True, help="anatomical MRI (e.g. T2): DICOM folder or volume file")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--target", action="append", nargs=3, type=float, metavar=("R", "A", "S"), default=None,
                   help="CT-RAS point (mm) for predicted TRE and the pictures; repeat for several")
    p.add_argument("--no-refine", action="store_true", help="landmark registration only")
    p.add_argument("--no-capsules", action="store_true",
                   help="capsule-free fusion: rigid mutual information from several starts (DICOM Patient "
                        "Position or principal axes), accepted only when unambiguous; also used automatically "
                        "when fewer than three capsule pairs exist")
    p.add_argument("--affine", action="store_true", help="add an affine stage after the rigid refinement")
    p.add_argument("--deformable", action="store_true",
                   help="try a coarse, regularised B-spline stage (kept only if it passes the acceptance checks)")
    p.add_argument("--max-rotation-deg", type=float, default=45.0,
                   help="largest patient rotation between the scans used to break ties in symmetric capsule layouts "
                        "(default 45; 0 disables the prior)")
    p.add_argument("--max-fre-mm", type=float, default=2.0, help="QA limit for the FRE (default 2 mm)")
    p.add_argument("--max-tre-mm", type=float, default=3.0, help="QA limit for predicted TRE at targets (default 3 mm)")
    from SmartBiopsyLib.cli.main import add_accept_warnings

    add_accept_warnings(p)
    p.set_defaults(func=run)


def _load(path: str, what: str):
    """Image loader of the project (DICOM folder or volume file) -> RasVolume."""
    from SmartBiopsyCoreLib.dataio.imageio import load_image

    vol = load_image(path)
    if not vol.name or vol.name == "volume":
        vol.name = what
    return vol


def run(args) -> int:
    from RegistrationFusionLib.registration import qa
    from RegistrationFusionLib.registration.intensity import IntensityFusionRefused
    from RegistrationFusionLib.registration.pipeline import IntensityFusion, fuse_with_fallback
    from SmartBiopsyLib.cli.main import ProgressBar
    from SmartBiopsyCoreLib.errors import InputDataError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputDataError(f"--out {out} exists and is not a folder; choose a folder")
    if args.max_fre_mm <= 0 or args.max_tre_mm <= 0:
        raise InputDataError("--max-fre-mm and --max-tre-mm must be positive millimetres")
    out.mkdir(parents=True, exist_ok=True)
    bar = ProgressBar("register")
    bar(0.0, "loading images")
    ct = _load(args.ct, "ct")
    mri = _load(args.mri, "mri")
    from SmartBiopsyCoreLib.modality import require_ct, require_mri

    require_ct(ct, f"--ct {args.ct}", "pass the planning CT (check that --ct and --mri are not swapped)")
    require_mri(mri, f"--mri {args.mri}", "pass the anatomical MRI (check that --ct and --mri are not swapped)")
    targets = None
    if args.target:
        targets = {f"T{i + 1}": list(t) for i, t in enumerate(args.target)}
    prior = None if args.max_rotation_deg <= 0 else float(args.max_rotation_deg)
    thresholds = qa.QAThresholds(max_fre_mm=args.max_fre_mm, max_predicted_tre_mm=args.max_tre_mm)
    try:
        result = fuse_with_fallback(
            ct, mri, use_capsules=not args.no_capsules, targets_ct=targets,
            match_options={"max_rotation_deg": prior}, do_refine=not args.no_refine,
            refine_options={"affine": args.affine, "deformable": args.deformable},
            thresholds=thresholds, progress=lambda f, m: bar(0.85 * f, m))
    except IntensityFusionRefused as exc:
        # the refusal is recorded (qa.json, registration.json); no transform is written
        if getattr(exc, "result", None) is not None:
            qa.build_intensity_report(exc.result, targets, thresholds).write_json(out / "qa.json")
            (out / "registration.json").write_text(jsonio.dumps(qa._clean(exc.result.to_dict()), with_reasons=True, indent=1,
                                                              default=qa._json_default))
        raise
    if isinstance(result, IntensityFusion):
        return _write_intensity(result, ct, mri, targets, out, bar, bool(getattr(args, "accept_warnings", False)))
    _write_outputs(result, ct, mri, targets, out, bar, "smartbiopsy register (capsule fusion)",
                   result.refinement if result.refinement is not None else result.matrix)
    rep = result.report
    summary = {
        "out": str(out), "passed": rep.passed, "failures": rep.failures, "fre_mm": round(rep.fre_mm, 3),
        "capsules_paired": len(result.correspondence.pairs), "capsules_used": int(len(result.landmark.used)),
        "refinement": None if result.refinement is None else result.refinement.reason,
        "predicted_tre_mm": {t.name: round(t.predicted_tre_mm, 3) for t in rep.targets},
        "notes": rep.notes,
    }
    print(jsonio.dumps(summary), file=sys.stdout)
    sys.stdout.flush()
    return _finish(rep, bool(getattr(args, "accept_warnings", False)))


def _finish(rep, accept: bool) -> int:
    """Exit code of an accepted fusion: 3 when its registration QA failed (0 with ``--accept-warnings``)."""
    from SmartBiopsyLib.cli.main import finish_with_warnings

    matter = [] if rep.passed else [f"registration QA failed ({'; '.join(map(str, rep.failures)) or 'see qa.json'})"]
    return finish_with_warnings(matter, accept)


def _write_outputs(result, ct, mri, targets, out: Path, bar, source: str, resample_with) -> None:
    """The files of an accepted fusion: ITK transforms, transform.json, the MRI on the CT, the QA pictures, qa.json
    and registration.json. ``resample_with``: the matrix or refinement result that maps the MRI onto the CT."""
    import numpy as np

    from RegistrationFusionLib.registration import qa, refine
    from SmartBiopsyCoreLib.dataio.imageio import save_image
    from SmartBiopsyCoreLib.dataio.transforms import write_transform_json

    bar(0.87, "writing transform and resampled MRI")
    m = result.matrix
    refine.write_itk_transform(m, str(out / "mri_to_ct.tfm"))
    refine.write_itk_transform(m, str(out / "mri_to_ct.h5"))
    write_transform_json(out / "transform.json", m, source)
    on_ct = refine.resample_mri_on_ct(mri, ct, resample_with)
    save_image(on_ct, out / "mri_on_ct.nrrd")
    bar(0.93, "QA pictures")
    if targets:
        point = np.asarray(next(iter(targets.values())), float)
    else:
        lo, hi = ct.bounds_ras()
        point = (lo + hi) / 2
    pics = qa.write_fusion_pictures(ct, on_ct, point, out)
    result.report.pictures = {k: Path(v).name for k, v in pics.items()}
    result.report.write_json(out / "qa.json")
    (out / "registration.json").write_text(jsonio.dumps(result.to_dict(), with_reasons=True, indent=1, default=qa._json_default))
    bar(1.0, "done")


def _write_intensity(result, ct, mri, targets, out: Path, bar, accept_warnings: bool = False) -> int:
    """Outputs of an accepted capsule-free fusion (same files as the capsule path; QA says intensity-only); the
    exit code follows its QA like the capsule path's."""
    _write_outputs(result, ct, mri, targets, out, bar, "smartbiopsy register (capsule-free intensity fusion)",
                   result.matrix)
    rep, res = result.report, result.intensity
    summary = {
        "out": str(out), "method": "intensity-only", "passed": rep.passed, "failures": rep.failures,
        "error_estimate_mm": round(res.error_estimate_mm, 2), "agreeing_starts": res.n_agreeing,
        "prior": res.prior, "capsules": result.fallback_reason, "seconds": round(res.seconds, 1), "notes": rep.notes,
    }
    print(jsonio.dumps(summary), file=sys.stdout)
    sys.stdout.flush()
    return _finish(rep, accept_warnings)

"""``smartbiopsy calibrate --ct CT --frame MODEL --out DIR``: the robot's base frame in CT coordinates.

Finds the robot's fiducial frame (built-in model name or a ``smartbiopsy.fiducial_frame/1`` JSON file) in
the planning CT, fits it, and writes ``calibration_qa.json`` and ``calibration.png`` and, only when the QA
passed, ``calibration.json`` (robot -> CT RAS with its QA; the file ``robot-send --calibration`` takes) and
``robot_to_ct.tfm`` (ITK/Slicer). Exit code 0 when the QA passed, 3 when the frame was fitted but failed its
QA (calibration_qa.json says why), 2 when no frame could be fitted.
"""
from __future__ import annotations

import json
import sys
from SmartBiopsyCoreLib.dataio import jsonio


def register(subparsers) -> None:
    from SmartBiopsyCoreLib.fiducial_frames.model import DEFAULT_MODEL, builtin_models

    p = subparsers.add_parser("calibrate", help="robot-to-CT calibration from the robot's fiducial frame in the CT",
                              description="Find the robot's fiducial frame in the planning CT, fit its model and "
                                          "write the robot-to-CT transform with its QA.")
    p.add_argument("--ct", required=True, help="planning CT with the frame in the field of view (DICOM folder or NRRD/NIfTI)")
    p.add_argument("--frame", default=DEFAULT_MODEL,
                   help=f"frame model: one of {', '.join(builtin_models())} or a model JSON file (default {DEFAULT_MODEL})")
    p.add_argument("--target", action="append", nargs=3, type=float, metavar=("R", "A", "S"), default=None,
                   help="CT RAS point (mm) where the predicted error is reported and checked; repeat for several")
    p.add_argument("--targets", help="targets JSON (from characterise or plan) whose points are checked")
    p.add_argument("--max-residual-mm", type=float, default=0.5, help="QA limit per fiducial (default 0.5 mm)")
    p.add_argument("--max-error-mm", type=float, default=1.5,
                   help="QA limit for the predicted 95th-percentile error at each target (default 1.5 mm)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.set_defaults(func=run)


def _targets(args) -> dict:
    from SmartBiopsyCoreLib.errors import InputDataError

    out = {f"T{i + 1}": list(t) for i, t in enumerate(args.target or [])}
    if args.targets:
        try:
            with open(args.targets, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise InputDataError(f"the targets file {args.targets} cannot be read ({type(exc).__name__})") from None
        items = data.get("targets", data.get("trajectories", [])) if isinstance(data, dict) else data
        for i, t in enumerate(items if isinstance(items, list) else []):
            if not isinstance(t, dict):
                continue
            p = t.get("point_ras", t.get("target_ras", t.get("ras")))
            if p is not None:
                out[str(t.get("name", t.get("region", f"T{i + 1}")))] = p
        if not out:
            raise InputDataError(f"the targets file {args.targets} has no target points (point_ras or target_ras)")
    return out


def run(args) -> int:
    from pathlib import Path

    from SmartBiopsyCoreLib.dataio.imageio import load_image
    from SmartBiopsyCoreLib.fiducial_frames.model import load_model
    from SmartBiopsyLib.cli.main import ProgressBar
    from TrajectoryPlannerLib.calibration.calibration_file import write_calibration
    from TrajectoryPlannerLib.calibration.frame_fit import CalibrationThresholds, calibrate_from_ct
    from TrajectoryPlannerLib.calibration.picture import write_calibration_picture

    model = load_model(args.frame)
    targets = _targets(args)
    ct = load_image(args.ct)
    from SmartBiopsyCoreLib.modality import require_ct

    require_ct(ct, f"--ct {args.ct}", "pass the planning CT with the robot's frame in it")
    bar = ProgressBar("calibrate")
    th = CalibrationThresholds(max_residual_mm=args.max_residual_mm, max_target_error_mm=args.max_error_mm)
    result = calibrate_from_ct(ct, model, targets, th, progress=bar)
    out = Path(args.out)
    paths = write_calibration(result, out)
    pic = write_calibration_picture(ct, result, out / "calibration.png")
    summary = {"passed": result.passed, "model": model.name, "residual_rms_mm": round(result.rms_mm, 4),
               "predicted_error_p95_mm": {k: round(v, 3) for k, v in result.target_errors.items()},
               "files": {**paths, "picture": pic}}
    print(jsonio.dumps(summary))
    if not result.passed:
        failed = [k for k, c in result.checks.items() if not c["passed"]]
        print(f"warning: robot calibration failed its QA ({', '.join(failed)}); no calibration.json was written, "
              "see calibration_qa.json", file=sys.stderr)
        return 3
    return 0

"""``smartbiopsy sample``: find the needle in the confirmation CT and measure the maps inside its notch.

    smartbiopsy sample --confirm-ct CT --plan plan.json --target A [--maps adc.nrrd ff.nrrd ef.nrrd]
                       [--transform mri_to_ct.json] [--mode side-notch|tip-distal] [--needle NAME]
                       [--planning-ct CT [--motion-tolerance MM] [--no-motion-correction]] --out DIR

Writes ``needle.json`` (tip, axis, lateral/depth/angle error against the plan) and ``notch_values.json``
(the notch ROI in CT world and mean/median/min/SD/voxels/volume of every map inside it).

Plan file: the planner's JSON (``trajectories`` with ``target``/``region``/``name``, ``entry_ras``,
``target_ras``, ``rank``; optional ``needle``) or a simple ``{"targets": [{"name", "entry_ras",
"target_ras"}]}``. Transform: the ``smartbiopsy.transform/1`` JSON that ``register`` writes (see
``SmartBiopsyCoreLib.dataio.transforms``), or an ITK transform file (.tfm/.txt/.h5) as Slicer writes it.
Map names come from the file names (``adc.nrrd`` -> ``adc``) or ``NAME=PATH``.

Patient motion: with ``--planning-ct`` the skin capsules of both CTs are compared; when they moved more than
``--motion-tolerance`` (default 2 mm) the confirmation CT is registered to the planning CT (capsules, then
intensity around the target) and the needle and notch are measured in the planning frame. ``needle.json``
and ``notch_values.json`` carry the check under ``patient_motion``; a warning names any motion left
uncorrected, and without ``--planning-ct`` says that motion was not checked.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MODES = ("side-notch", "tip-distal")


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="needle position and notch values from the confirmation CT",
                              description="Find the inserted needle near the planned path in the confirmation CT, "
                                          "compare it with the plan and measure every co-registered map inside "
                                          "the notch region.")
    p.add_argument("--confirm-ct", required=True, help="confirmation CT with the needle in place (DICOM folder or NRRD/NIfTI)")
    p.add_argument("--plan", required=True, help="plan JSON (planner output or targets with entry_ras/target_ras)")
    p.add_argument("--target", required=True, help="target name or region (e.g. A)")
    p.add_argument("--maps", nargs="*", default=[], help="parameter maps (ADC 1e-6 mm^2/s, FF %%, EF %%) as PATH or NAME=PATH")
    p.add_argument("--transform", help="MRI->CT registration (JSON 4x4 RAS or ITK .tfm/.h5); omit when the maps are in CT space")
    p.add_argument("--mode", choices=MODES, default="side-notch", help="notch region (default side-notch)")
    p.add_argument("--needle", help="needle model name (default: the plan's needle)")
    p.add_argument("--search-radius", type=float, default=15.0, help="needle search radius around the plan (mm, default 15)")
    p.add_argument("--threshold", type=float, default=1500.0, help="metal threshold (HU, default 1500)")
    p.add_argument("--tip-distal-length", type=float, default=20.0, help="tip-distal region length (mm, default 20)")
    p.add_argument("--tip-distal-diameter", type=float, default=2.0, help="tip-distal region diameter (mm, default 2)")
    p.add_argument("--planning-ct", help="planning CT (with the skin capsules): check and correct patient motion")
    p.add_argument("--motion-tolerance", type=float, default=2.0,
                   help="capsule motion (mm) above which the confirmation CT is registered to the planning CT (default 2)")
    p.add_argument("--no-motion-correction", action="store_true",
                   help="only report patient motion, do not correct for it")
    p.add_argument("--out", required=True, help="output folder (created)")
    from SmartBiopsyLib.cli.main import add_accept_warnings

    add_accept_warnings(p)
    p.set_defaults(func=run)


def _read_json(path, what):
    from SmartBiopsyCoreLib.errors import InputDataError

    if not os.path.isfile(path):
        raise InputDataError(f"the {what} {path} does not exist; check the path")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputDataError(f"the {what} {path} is not valid JSON ({exc.__class__.__name__}); write it again") from None


def load_plan_target(path, target: str):
    """(entry_ras, target_ras, needle name or None) of ``target`` in a plan file; the best-ranked trajectory wins."""
    import numpy as np

    from SmartBiopsyCoreLib.errors import InputDataError

    plan = _read_json(path, "plan file")
    if isinstance(plan, dict) and isinstance(plan.get("plan"), dict):
        plan = plan["plan"]
    if not isinstance(plan, dict):
        raise InputDataError(f"the plan file {path} holds no trajectories; use the planner's plan.json")
    rows = []
    for key in ("trajectories", "targets"):
        for t in plan.get(key) or []:
            if isinstance(t, dict) and t.get("entry_ras") is not None and t.get("target_ras") is not None:
                rows.append(t)
    if plan.get("shared_entry") and isinstance(plan["shared_entry"], dict):
        rows += [t for t in plan["shared_entry"].get("trajectories") or [] if isinstance(t, dict)]
    want = str(target).strip().lower()
    match = [t for t in rows if want in {str(t.get(k, "")).strip().lower() for k in ("target", "name", "region")}]
    if not match:
        names = sorted({str(t.get("target") or t.get("name")) for t in rows})
        raise InputDataError(f"target '{target}' is not in the plan {path} (it has: {', '.join(names) or 'none'}); "
                             "check --target")
    best = min(match, key=lambda t: (t.get("rank") if isinstance(t.get("rank"), (int, float)) else 1e9))
    try:
        entry = np.asarray(best["entry_ras"], float).reshape(3)
        tgt = np.asarray(best["target_ras"], float).reshape(3)
    except (TypeError, ValueError):
        raise InputDataError(f"target '{target}' in {path} has no valid entry_ras/target_ras (3 numbers each)") from None
    needle = best.get("needle")
    if isinstance(plan.get("needle"), dict):
        needle = needle or plan["needle"].get("name")
    elif isinstance(plan.get("needle"), str):
        needle = needle or plan["needle"]
    return entry, tgt, needle if isinstance(needle, str) else None


def _load_volume(path, what):
    from SmartBiopsyCoreLib.errors import InputDataError

    try:
        from SmartBiopsyCoreLib.dataio.imageio import load_image
    except ImportError:  # pragma: no cover - imageio is part of the package
        load_image = None
    if load_image is not None:
        return load_image(path)
    import SimpleITK as sitk

    from SmartBiopsyCoreLib.geometry import RasVolume

    if not os.path.exists(path):
        raise InputDataError(f"the {what} {path} does not exist; check the path")
    return RasVolume.from_sitk(sitk.ReadImage(str(path)), name=Path(path).stem)


def _map_items(items):
    from SmartBiopsyCoreLib.errors import InputDataError

    out = {}
    for item in items:
        if "=" in item and not os.path.exists(item):
            name, path = item.split("=", 1)
        else:
            path = item
            name = os.path.basename(item)
            for ext in (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd"):
                if name.lower().endswith(ext):
                    name = name[: -len(ext)]
                    break
        name = name.strip()
        if not name:
            raise InputDataError(f"map '{item}' has no name; use NAME=PATH")
        if name in out:
            raise InputDataError(f"two maps are called '{name}'; name them with NAME=PATH")
        out[name] = path
    return out


def run(args) -> int:
    from SmartBiopsyLib.cli.main import ProgressBar
    from SmartBiopsyCoreLib.errors import InputDataError
    from SmartBiopsyLib.sampling.needle import detect_needle
    from SmartBiopsyLib.sampling.notch import notch_roi_from_detection, sample_maps

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputDataError(f"--out {out} exists and is not a folder")
    if args.transform and not args.maps:
        raise InputDataError("--transform was given without --maps; add the maps to sample")
    entry, target, plan_needle = load_plan_target(args.plan, args.target)
    needle = args.needle or plan_needle
    if needle is None and args.mode == "side-notch":
        raise InputDataError("the side-notch region needs a needle model; pass --needle or use --mode tip-distal")
    map_paths = _map_items(args.maps)
    from SmartBiopsyCoreLib.dataio.transforms import load_mri_to_ct

    mri_to_ct = load_mri_to_ct(args.transform) if args.transform else None

    bar = ProgressBar("sample")
    bar(0.02, "loading the confirmation CT")
    ct = _load_volume(args.confirm_ct, "confirmation CT")
    from SmartBiopsyCoreLib.modality import require_ct

    require_ct(ct, f"--confirm-ct {args.confirm_ct}", "pass the confirmation CT with the needle in place")
    motion = None
    if args.planning_ct:
        from RegistrationFusionLib.capsules.detection import detect_capsules
        from SmartBiopsyLib.sampling.motion import check_patient_motion, to_planning_frame

        bar(0.03, "patient motion (skin capsules)")
        planning = _load_volume(args.planning_ct, "planning CT")
        require_ct(planning, f"--planning-ct {args.planning_ct}")
        from SmartBiopsyCoreLib.errors import SmartBiopsyError

        try:
            caps = detect_capsules(planning, "ct")
        except SmartBiopsyError:  # reported by the check as "not checked"
            caps = None
        motion = check_patient_motion(caps if caps is not None else [], ct, tolerance_mm=args.motion_tolerance,
                                      correct=not args.no_motion_correction, target_ras=target, planning_ct=planning)
        if motion.corrected:
            ct = to_planning_frame(ct, motion, planning, [entry, target])
    warnings = list(motion.warnings) if motion is not None else [
        "patient motion between the planning CT and this confirmation CT was not checked (no --planning-ct)"]
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    det = detect_needle(ct, entry, target, target_name=args.target, needle=needle,
                        search_radius_mm=args.search_radius, threshold_hu=args.threshold,
                        progress=lambda f, m: bar(0.05 + 0.5 * f, m))
    det.warnings = list(det.warnings) + warnings
    roi = notch_roi_from_detection(det, args.mode, needle, tip_distal_length_mm=args.tip_distal_length,
                                   tip_distal_diameter_mm=args.tip_distal_diameter)
    maps = {}
    for i, (name, path) in enumerate(map_paths.items()):
        bar(0.6 + 0.2 * i / max(len(map_paths), 1), f"loading {name}")
        maps[name] = _load_volume(path, f"map '{name}'")
    values = None
    if maps:
        values = sample_maps(roi, maps, mri_to_ct, progress=lambda f, m: bar(0.8 + 0.19 * f, m))
    bar(1.0, "done")

    from SmartBiopsyCoreLib.dataio.jsonio import dumps, write_json
    from SmartBiopsyCoreLib.dataio.outdir import OutputFolder
    from SmartBiopsyLib.cli.main import finish_with_warnings
    from SmartBiopsyLib.workflow import ANGLE_TOLERANCE_DEG, TIP_TOLERANCE_MM, needle_warnings

    matter = needle_warnings(det, args.target)
    folder = OutputFolder(out, owned=("needle.json", "notch_values.json"))
    stage = folder.begin()  # both files replace the previous ones together, only once both are written
    needle_doc = det.to_dict()
    needle_doc.update({"needle_model": needle, "confirmation_ct": str(args.confirm_ct), "plan": str(args.plan),
                       "patient_motion": None if motion is None else motion.to_dict(),
                       "acceptance": {"met": not matter, "warnings_that_matter": matter,
                                      "tolerances": {"needle_tip_mm": TIP_TOLERANCE_MM,
                                                     "needle_angle_deg": ANGLE_TOLERANCE_DEG}}})
    write_json(stage / "needle.json", needle_doc, indent=2)
    if values is not None:
        doc = values.to_dict()
        doc["maps_files"] = map_paths
        doc["transform_file"] = args.transform
        doc["patient_motion"] = needle_doc["patient_motion"]
        doc["warnings"] = list(doc.get("warnings") or []) + warnings
    else:
        doc = {"target_name": args.target, "roi": roi.to_dict(), "maps": {}, "warnings": ["no maps were given"]}
    write_json(stage / "notch_values.json", doc, indent=2)
    folder.commit()
    summary = {"target": args.target, "tip_ras": needle_doc["tip_ras"], "lateral_error_mm": needle_doc["lateral_error_mm"],
               "depth_error_mm": needle_doc["depth_error_mm"], "angle_deg": needle_doc["angle_deg"], "mode": args.mode,
               "means": {} if values is None else {k: round(v.mean, 3) for k, v in values.maps.items()},
               "patient_motion": "not checked" if motion is None else motion.summary(), "warnings": warnings,
               "warnings_that_matter": matter, "out": str(out)}
    print(dumps(summary), file=sys.stdout)
    sys.stdout.flush()
    return finish_with_warnings(matter, bool(getattr(args, "accept_warnings", False)))

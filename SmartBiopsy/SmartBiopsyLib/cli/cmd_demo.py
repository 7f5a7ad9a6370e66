"""``smartbiopsy demo`` (the phantom case end to end) and ``smartbiopsy run`` (a user's case).

demo: phantom case -> load -> capsule fusion -> maps -> habitats and targets -> three-target plan -> robot
session against the simulator (auto-confirmed, logged as such) -> simulated confirmation CT with the needle
at each target -> notch values -> specimen records -> scene bundle -> report. One progress bar per stage and
a summary table at the end.

run: the same stages on user data, from a case folder or explicit inputs; any step's result can be supplied
instead of computed (``--transform``, ``--adc/--ff/--ef``, ``--targets``). The run stops at the first step that
cannot proceed with one clear message and keeps the outputs of the steps that finished.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

#: the simulated robot's fiducial frame, placed in the phantom CT and calibrated by the demo
DEMO_ROBOT_FRAME = "zframe-7tube"

import numpy as np

logger = logging.getLogger(__name__)

PHANTOM_RISK_LABELS = {4: "aorta", 5: "ivc", 6: "kidney", 7: "bowel"}


def register(subparsers) -> None:
    from SmartBiopsyLib.cli.helptext import plain_help

    p = subparsers.add_parser("demo", help="the full smart-biopsy demo on the phantom case",
                              description="Run the whole procedure on the digital phantom and write a scene "
                                          "bundle, report and all results.")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--no-phantom-cache", action="store_true",
                   help="generate the phantom afresh instead of reusing it from the user cache folder "
                        "(~/.cache/smartbiopsy/phantom; SMARTBIOPSY_PHANTOM_CACHE=0 also turns the cache off)")
    p.add_argument("--dicom", action="store_true", help="write the phantom as DICOM and load it from DICOM")
    p.add_argument("--no-refine", action="store_true", help="landmark registration only")
    p.add_argument("--deformation", action="store_true",
                   help="simulate a smooth soft-tissue deformation (up to ~3 mm) around the tumour between MRI and "
                        "CT; the true displacement is written to phantom/truth/displacement_ct.nrrd")
    p.add_argument("--notch-mode", choices=("side-notch", "tip-distal"), default="side-notch",
                   help="notch region sampled: side-notch (default; the needle's side notch) or tip-distal")
    from SmartBiopsyLib.cli.main import add_accept_warnings

    add_accept_warnings(p)
    p.set_defaults(func=run_demo)

    r = subparsers.add_parser("run", help="the procedure on a user's case (stops at the first failing step)",
                              description=plain_help(__doc__.split("run:", 1)[1].strip()))
    r.add_argument("--case", help="case folder: every series is loaded and recognised by its description")
    r.add_argument("--ct", help="planning CT (DICOM folder or volume file)")
    r.add_argument("--t2", help="anatomical MRI for the capsule fusion")
    r.add_argument("--dwi", help="DWI: a multi-b DICOM series folder")
    r.add_argument("--dixon-water", help="Dixon water image; with --dixon-fat gives the FF map")
    r.add_argument("--dixon-fat", help="Dixon fat image; with --dixon-water gives the FF map")
    r.add_argument("--t1-pre", help="T1-weighted image before contrast; with --t1-post gives the EF map")
    r.add_argument("--t1-post", help="T1-weighted image after contrast")
    r.add_argument("--tumour", help="tumour label map on an MRI grid (non-zero = tumour)")
    r.add_argument("--risk", action="append", default=[], help="risk-structure label map on the CT grid (repeatable)")
    r.add_argument("--transform", help="MRI->CT transform instead of the capsule fusion (JSON 4x4 RAS or .tfm/.h5)")
    r.add_argument("--adc", help="precomputed ADC map (10^-6 mm^2/s) instead of the one computed from --dwi")
    r.add_argument("--ff", help="precomputed fat fraction map (%%) instead of the one from Dixon")
    r.add_argument("--ef", help="precomputed enhancement fraction map (%%) instead of the one from T1 pre/post")
    r.add_argument("--targets", help="targets.json instead of the habitat targets (CT world)")
    r.add_argument("--dce", help="DCE folder (frames stored as separate DICOM series) instead of T1 pre/post")
    r.add_argument("--dce-baseline-frames", type=int, help="DCE baseline frames (default: before bolus arrival)")
    r.add_argument("--dce-post-time", type=float, help="DCE post-contrast time in s from the first frame (default: peak)")
    r.add_argument("--map-transform", action="append", default=[], metavar="NAME=PATH",
                   help="transform of the ef or ff map's series onto the DWI/ADC world when it comes from another "
                        "frame of reference (smartbiopsy.transform/1 JSON or ITK file; repeatable)")
    r.add_argument("--needle", default="", help="needle model name")
    r.add_argument("--mode", choices=("oblique", "in-plane"), default="oblique",
                   help="planning: oblique (default; double-oblique paths for the robot) or in-plane (axial paths)")
    r.add_argument("--notch-mode", choices=("side-notch", "tip-distal"), default="side-notch",
                   help="notch region sampled: side-notch (default) or tip-distal")
    r.add_argument("--robot", choices=("simulator", "none"), default="none",
                   help="send the plan to the robot simulator (needs --confirm) or stop before the robot")
    r.add_argument("--confirm", action="store_true", help="the operator confirms the plan for the robot")
    r.add_argument("--robot-frame-model", default="",
                   help="the robot's fiducial frame in the planning CT (built-in model name or model JSON): the run "
                        "computes the robot-to-CT calibration from it before the robot step")
    r.add_argument("--operator", default="operator", help="operator name recorded with the plan confirmation")
    r.add_argument("--confirm-ct", action="append", default=[], metavar="[TARGET=]PATH",
                   help="confirmation CT with the needle in place (DICOM folder or volume file), repeatable; "
                        "TARGET=PATH names its target, a bare PATH goes to the nearest planned path. CT series of "
                        "--case described as confirmation/needle/biopsy or acquired after the planning CT count too")
    r.add_argument("--motion-tolerance", type=float, default=2.0,
                   help="skin-capsule motion (mm) between planning and confirmation CT that is corrected (default 2)")
    r.add_argument("--no-motion-correction", action="store_true",
                   help="report patient motion but do not correct the needle position for it")
    r.add_argument("--out", required=True, help="output folder (created): summary.json, report.html, scene.mrb, run.log")
    add_accept_warnings(r)
    r.set_defaults(func=run_user)


# ---------------------------------------------------------------------------------------------- demo
def run_demo(args) -> int:
    from SmartBiopsyCoreLib.dataio.outdir import OutputFolder
    from SmartBiopsyLib.workflow import RUN_OUTPUTS

    out = Path(args.out)
    folder = OutputFolder(out, owned=RUN_OUTPUTS)  # refused before any work when it cannot be written
    stage = folder.begin()
    try:
        return _run_demo_staged(args, out, folder, stage)
    finally:
        if folder.staging is not None:  # stopped before the workflow took the outputs over
            folder.commit()


def _run_demo_staged(args, out: Path, folder, stage: Path) -> int:
    from SmartBiopsyLib.cli.main import ProgressBar, finish_with_warnings
    from SmartBiopsyCoreLib.dataio.imageio import load_image
    from SmartBiopsyCoreLib.phantom.sarcoma import B_VALUES, generate_phantom
    from SmartBiopsyLib.workflow import CaseInputs, RunOptions, run_case, run_warnings

    t0 = time.perf_counter()
    bar = ProgressBar("phantom")
    deformation = bool(getattr(args, "deformation", False))
    case = generate_phantom(args.seed, deformation=deformation, progress=lambda f, m: bar(0.7 * f, m),
                            robot_frame=DEMO_ROBOT_FRAME, disk_cache=not getattr(args, "no_phantom_cache", False))
    src = stage / "phantom"
    case.write(src, dicom=args.dicom, progress=lambda f, m: bar(0.7 + 0.3 * f, m))
    bar(1.0, f"seed {args.seed}")
    t_phantom = time.perf_counter() - t0

    # load the case back as a user would (from DICOM with --dicom, else from the NRRD files)
    t1 = time.perf_counter()
    if args.dicom:
        from SmartBiopsyCoreLib.dataio.dicomio import load_dwi_series

        d = src / "dicom"
        ct = load_image(d / "ct")
        mri = {k: load_image(d / k) for k in ("t2", "dixon_water", "dixon_fat", "t1_pre", "t1_post")}
        dwi = load_dwi_series(d / "dwi")
    else:
        ct = load_image(src / "ct.nrrd")
        mri = {k: load_image(src / f"mri_{k}.nrrd") for k in ("t2", "dixon_water", "dixon_fat", "t1_pre", "t1_post")}
        dwi = {b: load_image(src / f"mri_dwi_b{int(b)}.nrrd") for b in B_VALUES}
    labels = load_image(src / "truth" / "ct_labels.nrrd")
    tumour = load_image(src / "truth" / "tumour_mask_mri.nrrd")
    t_load = time.perf_counter() - t1
    logger.info("demo: the phantom's tumour outline stands in for the radiologist's segmentation, and its "
                "aorta/IVC/kidney/bowel labels for the user's risk segments")
    inputs = CaseInputs(name=f"PHANTOM{args.seed:04d}", ct=ct, mri_anatomical=mri["t2"], dwi=dwi,
                        dixon_water=mri["dixon_water"], dixon_fat=mri["dixon_fat"], t1_pre=mri["t1_pre"],
                        t1_post=mri["t1_post"], tumour=tumour, risk_labelmaps=[(labels, PHANTOM_RISK_LABELS)],
                        synthetic=True, truth=case.truth,
                        source=f"digital phantom seed {args.seed}" + (" with deformation" if deformation else ""))
    options = RunOptions(refine=not args.no_refine, notch_mode=args.notch_mode, operator="demo operator",
                         auto_confirm=True, robot="simulator", synthetic_pathology=True, seed=args.seed,
                         robot_frame_model=DEMO_ROBOT_FRAME,
                         demo_confirmation=True, export=True, export_accession=f"SIMULATED-{args.seed:04d}")
    run = run_case(inputs, out, options, progress_factory=lambda name: ProgressBar(name), output_folder=folder)
    _print_summary(run, extra=[("phantom", t_phantom, f"seed {args.seed}, written to {out / 'phantom'}"),
                               ("read back", t_load, "volumes read back from " + ("DICOM" if args.dicom else "NRRD"))])
    return finish_with_warnings(run_warnings(run), bool(getattr(args, "accept_warnings", False)))


# ---------------------------------------------------------------------------------------------- run
def run_user(args) -> int:
    """``run``: load (a case folder and/or explicit inputs), then every stage. ``summary.json`` is written
    whatever happens: by the workflow once the stages run, by :func:`_fail_load` when loading stops."""
    from SmartBiopsyCoreLib.dataio.outdir import OutputFolder
    from SmartBiopsyLib.workflow import USER_RUN_OUTPUTS

    out = Path(args.out)
    folder = OutputFolder(out, owned=USER_RUN_OUTPUTS)  # refused before any work when it cannot be written
    stage = folder.begin()
    try:
        return _run_user_staged(args, out, folder, stage)
    finally:
        if folder.staging is not None:  # stopped while loading, before the workflow took the outputs over
            folder.commit()


def _run_user_staged(args, out: Path, folder, stage: Path) -> int:
    from SmartBiopsyCoreLib.errors import SmartBiopsyError
    from SmartBiopsyLib.workflow import StageFailed

    vols = {}
    intake = None
    if args.case:
        try:
            roles, intake = _recognise_case_folder(args.case)
        except SmartBiopsyError as exc:
            _fail_load(stage, str(exc), {"path": str(args.case), "used": {}, "skipped": []})
        vols.update(roles)
        _print_intake(intake)
    try:
        return _run_user_loaded(args, out, vols, intake, folder)
    except StageFailed:
        raise
    except SmartBiopsyError as exc:
        _fail_load(stage, str(exc), intake)


def _run_user_loaded(args, out, vols, intake, folder=None) -> int:
    from SmartBiopsyLib.cli.main import ProgressBar, finish_with_warnings
    from SmartBiopsyCoreLib.errors import InputDataError
    from SmartBiopsyCoreLib.dataio.imageio import load_image
    from SmartBiopsyLib.workflow import CaseInputs, RunOptions, StageFailed, run_case, run_warnings
    confirm_cts = [{"target": None, "ct": v, "source": f"--case series '{v.name}'"} for v in vols.pop("confirm_cts", [])]
    confirm_cts += _load_confirm_cts(args.confirm_ct)

    def opt(path, key):
        if path:
            try:
                vols[key] = load_image(path)
            except InputDataError as exc:
                raise InputDataError(f"--{key.replace('_', '-')}: {exc}") from None
    for key in ("ct", "t2", "dixon_water", "dixon_fat", "t1_pre", "t1_post", "tumour", "adc", "ff", "ef"):
        opt(getattr(args, key), key)
    dwi = vols.pop("dwi", None)
    if args.dwi:
        from SmartBiopsyCoreLib.dataio.dicomio import load_dwi_series
        dwi = load_dwi_series(args.dwi)
    if args.dce:
        from SmartBiopsyCoreLib.dataio.imageio import load_time_series
        vols["dce"] = load_time_series(args.dce, "DCE")
    map_transforms = {}
    for it in args.map_transform:
        from SmartBiopsyCoreLib.dataio.transforms import load_mri_to_ct
        name, sep, path = it.partition("=")
        if not sep or name not in ("ef", "ff"):
            raise InputDataError(f"--map-transform {it!r} needs the form NAME=PATH with NAME ef or ff")
        map_transforms[name] = load_mri_to_ct(path)
    if "ct" not in vols:
        raise InputDataError("no planning CT was given; pass --ct (or a --case folder with a CT series)")
    mri_to_ct = None
    if args.transform:
        from SmartBiopsyCoreLib.dataio.transforms import load_mri_to_ct
        mri_to_ct = load_mri_to_ct(args.transform)
    targets_ct = None
    if args.targets:
        targets_ct = _load_targets(args.targets)
    risk = [(load_image(p), None) for p in args.risk]
    inputs = CaseInputs(name=Path(args.case or args.ct).name or "case", ct=vols["ct"], mri_anatomical=vols.get("t2"),
                        dwi=dwi, dixon_water=vols.get("dixon_water"), dixon_fat=vols.get("dixon_fat"),
                        t1_pre=vols.get("t1_pre"), t1_post=vols.get("t1_post"), tumour=vols.get("tumour"),
                        risk_labelmaps=risk, mri_to_ct=mri_to_ct, adc=vols.get("adc"), ff=vols.get("ff"),
                        ef=vols.get("ef"), targets_ct=targets_ct, source=str(args.case or args.ct),
                        dce=vols.get("dce"), map_transforms=map_transforms, intake=intake, confirm_cts=confirm_cts)
    if not np.isfinite(args.motion_tolerance) or args.motion_tolerance <= 0:
        raise InputDataError("--motion-tolerance must be a positive number of mm")
    options = RunOptions(needle=args.needle, planning_mode=args.mode, notch_mode=args.notch_mode,
                         operator=args.operator, auto_confirm=bool(args.confirm), robot=args.robot,
                         dce_baseline_frames=args.dce_baseline_frames, dce_post_time_s=args.dce_post_time,
                         robot_frame_model=args.robot_frame_model, motion_tolerance_mm=float(args.motion_tolerance),
                         correct_motion=not args.no_motion_correction)
    try:
        run = run_case(inputs, out, options, progress_factory=lambda name: ProgressBar(name), output_folder=folder)
    except StageFailed as exc:
        print(f"stopped at step '{exc.stage}'; outputs of the finished steps are in {out}", file=sys.stderr)
        raise
    _print_summary(run)
    if run.stopped is not None:
        print(f"stopped at step '{run.stopped[0]}': {run.stopped[1]}; summary.json and report.html are in {out}",
              file=sys.stderr)
    return finish_with_warnings(run_warnings(run), bool(getattr(args, "accept_warnings", False)))


def _load_confirm_cts(items) -> list:
    """``--confirm-ct [TARGET=]PATH`` values -> [{"target", "ct", "source"}] (target None: match by path)."""
    import os

    from SmartBiopsyCoreLib.dataio.imageio import load_image
    from SmartBiopsyCoreLib.errors import InputDataError

    out = []
    for item in items or []:
        target, path = None, item
        if "=" in item and not os.path.exists(item):
            target, path = (x.strip() for x in item.split("=", 1))
            if not target or not path:
                raise InputDataError(f"--confirm-ct '{item}' is not TARGET=PATH; e.g. --confirm-ct A=confirm_a/")
        try:
            ct = load_image(path)
        except InputDataError as exc:
            raise InputDataError(f"--confirm-ct {item}: {exc}") from None
        out.append({"target": target, "ct": ct, "source": str(path)})
    return out


def _fail_load(out: Path, message: str, intake: dict | None = None):
    from SmartBiopsyCoreLib.errors import InputDataError
    from SmartBiopsyLib.workflow import write_json

    summary = {"case": {}, "stages": [{"name": "load", "status": "failed", "seconds": 0, "message": message}]}
    if intake:
        summary["intake"] = intake
        write_json(out / "inputs" / "series_used.json", intake)
    write_json(out / "summary.json", summary)
    raise InputDataError(message)


def _print_intake(intake: dict) -> None:
    """Which series of the case folder are used for what, and which were skipped (stdout)."""
    print(f"case folder {intake['path']}:")
    for role, what in intake["used"].items():
        print(f"  {role:<12} {what}")
    for s in intake.get("not_used", []):
        print(f"  not used     {s['series']}: {s['reason']}")
    for s in intake["skipped"]:
        print(f"  skipped      {s['series']}: {s['reason']}")
    sys.stdout.flush()


def _series_text(v) -> str:
    m = v.meta or {}
    num = m.get("series_number")
    return f"'{m.get('series_description') or v.name}'" + (f" (series {num})" if num is not None else "")


def _recognise_case_folder(path) -> tuple[dict, dict]:
    """Map the series of a case folder to roles by their descriptions (case-insensitive keywords).

    Returns ``(roles, intake)``: roles {ct, t2, dwi {b: vol}, dixon_water, dixon_fat, t1_pre, t1_post, dce,
    tumour, adc}; intake {"path", "used" {role: series}, "not_used", "skipped" [{series, reason}]}. A scanner
    ADC map is not used when the DWI is there (the ADC is computed from it).
    """
    from SmartBiopsyCoreLib.errors import InputDataError
    from SmartBiopsyCoreLib.dataio.imageio import load_study_intake

    study = load_study_intake(path)
    roles: dict = {}
    dwi: dict = {}
    not_used = []
    confirm = _split_confirmation_cts(study.volumes)
    if confirm:
        roles["confirm_cts"] = confirm
    for name, v in study.volumes.items():
        if any(v is c for c in confirm):
            continue
        low = name.lower()
        mod = str(v.meta.get("modality", "")).upper()
        b = v.meta.get("b_value")
        role, why = None, "no role recognised from its description"
        if b is not None:
            dwi[float(b)] = v
            continue
        elif mod == "CT" or low.startswith("ct") or "_ct" in low:
            role, why = ("ct", "") if "ct" not in roles else (None, "a second CT; the first one is used")
        elif "water" in low:
            role = "dixon_water"
        elif "fat" in low and "sat" not in low:
            role = "dixon_fat"
        elif "post" in low:
            role = "t1_post"
        elif "pre" in low:
            role = "t1_pre"
        elif "t2" in low:
            role, why = ("t2", "") if "t2" not in roles else (None, "a second T2; the first one is used for fusion")
        elif "tumour" in low or "tumor" in low:
            role = "tumour"
        elif "adc" in low:
            role = "adc"
        if role is None:
            not_used.append({"series": _series_text(v), "reason": why})
            continue
        if role in roles:
            not_used.append({"series": _series_text(roles[role]), "reason": f"replaced by a later {role} series"})
        roles[role] = v
    for name, ts in study.time_series.items():
        if ts.kind == "DCE" and "dce" not in roles:
            roles["dce"] = ts
        else:
            not_used.append({"series": ts.label, "reason": "a variable-flip-angle T1 set (T1 mapping is not used)"
                             if ts.kind == "VFA" else "a second DCE series"})
    if dwi:
        roles["dwi"] = dwi
        if "adc" in roles:
            not_used.append({"series": _series_text(roles.pop("adc")),
                             "reason": "scanner ADC map; the ADC is computed from the DWI"})
    used = {}
    for role, v in roles.items():
        if role == "dwi":
            first = next(iter(v.values()))
            used[role] = f"{_series_text(first)} b = {'/'.join(f'{b:g}' for b in sorted(v))} s/mm^2"
        elif role == "dce":
            used[role] = v.label
        elif role == "confirm_cts":
            used["confirmation CTs"] = ", ".join(_series_text(c) for c in v)
        else:
            used[role] = _series_text(v)
    intake = {"path": str(path), "used": used, "not_used": not_used,
              "skipped": [s.to_dict() for s in study.skipped]}
    if not roles:
        raise InputDataError(f"no series of {path} could be recognised (CT, T2, DWI, Dixon, T1 pre/post, DCE); "
                             "pass the inputs explicitly with --ct, --t2, --dwi, ...")
    return roles, intake


#: Series-description words that mark a CT as a confirmation CT (needle in place).
CONFIRM_CT_WORDS = ("confirm", "needle", "biopsy", "check", "kontroll")


def _is_ct(name: str, v) -> bool:
    low = name.lower()
    return v.meta.get("b_value") is None and (str(v.meta.get("modality", "")).upper() == "CT" or low.startswith("ct")
                                              or "_ct" in low)


def _acquired(v) -> str:
    return f"{v.meta.get('acquisition_date') or ''}{v.meta.get('acquisition_time') or ''}"


def _split_confirmation_cts(vols: dict) -> list:
    """The CT series of a study that are confirmation CTs: described as such (:data:`CONFIRM_CT_WORDS`) or,
    when several CTs remain, every one acquired after the earliest (the planning CT)."""
    cts = [(n, v) for n, v in vols.items() if _is_ct(n, v)]
    if len(cts) < 2:
        return []
    desc = lambda n, v: f"{n} {v.meta.get('series_description') or ''}".lower()  # noqa: E731
    confirm = [v for n, v in cts if any(w in desc(n, v) for w in CONFIRM_CT_WORDS)]
    rest = [(n, v) for n, v in cts if not any(v is c for c in confirm)]
    if len(rest) > 1:
        if not all(_acquired(v) for _, v in rest):
            from SmartBiopsyCoreLib.errors import InputDataError

            raise InputDataError("the case folder holds several CT series without acquisition times; pass the "
                                 "planning CT with --ct and the confirmation CTs with --confirm-ct")
        rest.sort(key=lambda nv: _acquired(nv[1]))
        confirm += [v for _, v in rest[1:]]
    return confirm


def _load_targets(path) -> dict:
    from SmartBiopsyCoreLib.errors import InputDataError

    try:
        data = json.loads(Path(path).read_text())
        out = {}
        for t in data["targets"]:
            pt = t.get("point_ct_ras", t.get("point_ras"))
            out[str(t.get("region") or t["name"])] = np.asarray(pt, float).reshape(3)
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputDataError(f"--targets {path} is not a targets.json with RAS points ({exc})") from None


def _print_summary(run, extra=()) -> None:
    """The end-of-run table. The total and the peak memory are the run's own (summary.json, the report): the
    demo's preparation rows (``extra``: phantom, read back) come before the run and are not in the total."""
    rows = [(n, s, m) for n, s, m in extra] + [(s.name, s.seconds, s.message) for s in run.stages]
    summ = run.summary()
    total = float(summ["total_seconds"])
    w = sys.stdout
    w.write("\nSmartBiopsy — " + run.inputs.source + "\n")
    w.write(f"{'stage':<13} {'time s':>7}  result\n" + "-" * 78 + "\n")
    for k, (n, s, m) in enumerate(rows):
        if extra and k == len(extra):
            w.write(f"{'':<13} {'':>7}  (above: demo preparation, before the run; below: the run)\n")
        w.write(f"{n:<13} {s:7.1f}  {m[:120]}\n")
    w.write("-" * 78 + "\n" + f"{'total':<13} {total:7.1f}  {summ.get('total_covers', '')}\n")
    for line in run.lines:
        w.write(f"  {line}\n")
    w.write(f"  peak memory {summ['peak_memory_mb']:.0f} MB; outputs in {run.out} (report.html, scene.mrb)\n")
    w.flush()

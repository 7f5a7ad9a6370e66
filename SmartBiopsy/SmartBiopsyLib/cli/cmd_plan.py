"""``smartbiopsy plan``: margin-aware needle trajectories for the biopsy targets, a shared entry, a skin map.

    smartbiopsy plan --ct CT --targets targets.json [--risk SEG_OR_LABELMAP ...] [--risk-labels aorta=4,ivc=5]
                     [--margin aorta=12 ...] [--needle NAME] [--mode in-plane|oblique] [--max-angle DEG]
                     [--patient-position supine|prone|none] --out DIR
                     [--habitats habitats.nrrd [--transform mri_to_ct.json] [--registration-error MM]]

Writes DIR/plan.json ({"targets", "trajectories", "shared_entry", "rejections", ...}; RAS mm) and
DIR/skin_accessibility.vtp (skin surface with ClearanceMM / TargetsReachable point values, LPS file).
With --habitats every trajectory in plan.json carries ``hit_probability``: the probability that the notch,
fired along that path, has at least 50 % of its volume inside the target's habitat (Monte Carlo over the
registration error and the needle's lateral placement error; see SmartBiopsyLib.characterise.hitprob).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from SmartBiopsyCoreLib.dataio import jsonio


def register(subparsers) -> None:
    from TrajectoryPlannerLib.planning.needles import DEFAULT_NEEDLE, needle_names

    p = subparsers.add_parser(
        "plan", help="plan safe needle trajectories to the targets (margins, needle reach, angles)",
        description="Plan ranked, margin-aware straight needle paths from the skin to each target on the planning "
                    "CT, a shared skin entry for all targets when possible, and a skin accessibility map.")
    p.add_argument("--ct", required=True, help="planning CT in HU (DICOM folder or NRRD/NIfTI file)")
    p.add_argument("--targets", required=True, help='targets.json: {"targets": [{"name", "region", "point_ras"}]}')
    p.add_argument("--risk", action="append", default=[],
                   help="risk structures: a label map or single-layer .seg.nrrd (repeatable)")
    p.add_argument("--risk-labels", default="",
                   help="names of label values, e.g. aorta=4,ivc=5,kidney=6,bowel=7 (.seg.nrrd files carry their own)")
    p.add_argument("--margin", action="append", default=[], metavar="NAME=MM",
                   help="safety margin override in mm (repeatable); defaults: aorta/ivc 10, bowel 5, bone 3, kidney 5, "
                        "others 5")
    p.add_argument("--needle", default=DEFAULT_NEEDLE, help=f"needle set: {', '.join(needle_names())}")
    p.add_argument("--mode", choices=("oblique", "in-plane"), default="oblique",
                   help="oblique: double-oblique paths up to --max-angle (robot); in-plane: gantry-aligned axial paths")
    p.add_argument("--max-angle", type=float, default=60.0, help="oblique mode: largest angle to the axial plane (deg)")
    p.add_argument("--in-plane-tolerance", type=float, default=1.0, help="in-plane mode: tolerance (deg)")
    p.add_argument("--patient-position", choices=("supine", "prone", "none"), default="supine",
                   help="excludes entries from the table side (default supine: posterior)")
    p.add_argument("--top-n", type=int, default=5, help="trajectories kept per target (default 5)")
    p.add_argument("--no-shared-entry", action="store_true", help="do not look for one entry serving all targets")
    p.add_argument("--no-auto-risk", action="store_true", help="do not add bone and gas found in the CT")
    p.add_argument("--allow-partial", action="store_true",
                   help="write a plan even if some target has no safe path (its reason goes to plan.json)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--habitats", help="habitats.nrrd from 'characterise': adds each path's hit probability "
                                      "(notch at least 50%% inside the target's habitat) to plan.json")
    p.add_argument("--transform", help="with --habitats: MRI->CT registration (JSON 4x4 RAS or ITK .tfm/.h5); "
                                       "omit when the habitat map is in CT space")
    p.add_argument("--registration-error", type=float, default=None, metavar="MM",
                   help="with --habitats: registration error at the targets, RMS mm (default: each target's "
                        "predicted_tre_mm in the targets file)")
    p.add_argument("--notch-mode", choices=("side-notch", "tip-distal"), default="side-notch",
                   help="with --habitats: notch region for the hit probability")
    p.set_defaults(func=run)


def _parse_pairs(text_items, what, cast):
    from SmartBiopsyCoreLib.errors import InputDataError

    out = {}
    for item in text_items:
        for part in filter(None, (s.strip() for s in item.split(","))):
            name, sep, value = part.partition("=")
            try:
                if not sep or not name.strip():
                    raise ValueError
                out[name.strip()] = cast(value)
            except ValueError:
                raise InputDataError(f"{what} '{part}' is not NAME=VALUE (e.g. aorta=4)") from None
    return out


def _read_targets(path):
    from SmartBiopsyCoreLib.errors import InputDataError

    p = Path(path)
    if not p.is_file():
        raise InputDataError(f"targets file {p} does not exist; write the targets with 'smartbiopsy characterise'")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputDataError(f"targets file {p.name} is not valid JSON ({exc}); fix or regenerate it") from None
    if not isinstance(data, dict) or not isinstance(data.get("targets"), list) or not data["targets"]:
        raise InputDataError(f'targets file {p.name} needs a non-empty "targets" list of {{"name", "point_ras"}}')
    if str(data.get("frame", "RAS")).upper() != "RAS":
        raise InputDataError(f"targets file {p.name} is in frame {data['frame']}; the planner needs RAS (mm)")
    return data["targets"]


def _segment_names(path) -> dict[int, str]:
    """Label value -> segment name from a .seg.nrrd header (empty for plain label maps)."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return {}
    keys = set(r.GetMetaDataKeys())
    names, layers = {}, set()
    i = 0
    while f"Segment{i}_Name" in keys:
        value = int(r.GetMetaData(f"Segment{i}_LabelValue")) if f"Segment{i}_LabelValue" in keys else i + 1
        names[value] = r.GetMetaData(f"Segment{i}_Name")
        layers.add(r.GetMetaData(f"Segment{i}_Layer") if f"Segment{i}_Layer" in keys else "0")
        i += 1
    if len(layers) > 1:
        from SmartBiopsyCoreLib.errors import InputDataError
        raise InputDataError(f"{Path(path).name} has overlapping segments in {len(layers)} layers; export the "
                             "segmentation as a label map (one value per structure) and pass that")
    return names


def _hit_probabilities(args, targets, result) -> dict:
    """{trajectory name: hit probability dict} for every planned path (its own direction), from --habitats."""
    from SmartBiopsyCoreLib.dataio.imageio import load_image
    from SmartBiopsyCoreLib.dataio.transforms import load_mri_to_ct
    from SmartBiopsyCoreLib.errors import InputDataError
    from SmartBiopsyLib.characterise.hitprob import planned_hit_probabilities

    rms = {}
    for t in targets:
        if isinstance(t, dict) and t.get("predicted_tre_mm") is not None:
            for key in (t.get("name"), t.get("region")):
                if key:
                    rms[str(key)] = float(t["predicted_tre_mm"])

    def reg_error(traj):
        if args.registration_error is not None:
            return args.registration_error
        for key in (traj.target, traj.region):
            if key in rms:
                return rms[key]
        raise InputDataError(f"target {traj.target} has no predicted_tre_mm in the targets file; give the "
                             "registration error with --registration-error MM")

    labels = load_image(args.habitats)
    mri_to_ct = load_mri_to_ct(args.transform) if args.transform else None
    out = {}
    for traj in result.trajectories:
        (hp,) = planned_hit_probabilities(labels, [traj], mri_to_ct, reg_error(traj), needle=args.needle,
                                          mode=args.notch_mode)
        if hp is not None:
            out[traj.name] = hp.to_dict()
    return out


def run(args) -> int:
    from SmartBiopsyLib.cli.main import ProgressBar
    from SmartBiopsyCoreLib.errors import InputDataError
    from SmartBiopsyCoreLib.dataio.imageio import load_image
    from TrajectoryPlannerLib.planning import engine, skinmap
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputDataError(f"--out {out} exists and is not a folder")
    if args.top_n < 1:
        raise InputDataError(f"--top-n must be at least 1 (got {args.top_n})")
    if (args.transform or args.registration_error is not None) and not args.habitats:
        raise InputDataError("--transform and --registration-error are for the hit probability; add --habitats")
    targets = _read_targets(args.targets)
    label_names = {int(v): k for k, v in _parse_pairs([args.risk_labels], "--risk-labels", int).items()}
    margins = _parse_pairs(args.margin, "--margin", float)
    if any(v < 0 for v in margins.values()):
        raise InputDataError("safety margins must be zero or positive (mm)")
    ct = load_image(args.ct)
    from SmartBiopsyCoreLib.modality import require_ct

    require_ct(ct, f"--ct {args.ct}")
    labelmaps = []
    for path in args.risk:
        try:
            lm = load_image(path)
        except ValueError as exc:
            raise InputDataError(f"risk structures {Path(path).name} cannot be read as a label map ({exc}); "
                                 "export them as a label map") from None
        names = _segment_names(path) or label_names or None
        labelmaps.append((lm, names))
    settings = engine.PlanSettings(mode=args.mode, max_angle_deg=args.max_angle,
                                   in_plane_tolerance_deg=args.in_plane_tolerance, top_n=args.top_n,
                                   shared_entry=not args.no_shared_entry, allow_partial=args.allow_partial)
    bar = ProgressBar("plan")
    result = engine.plan(ct, targets, args.needle, labelmaps, margins, settings, args.patient_position,
                         auto_structures=not args.no_auto_risk, progress=lambda f, m: bar(0.9 * f, m))
    plan_doc = result.to_dict()
    hits = _hit_probabilities(args, targets, result) if args.habitats else {}
    for td in plan_doc["trajectories"]:
        if td["name"] in hits:
            td["hit_probability"] = hits[td["name"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(jsonio.dumps(plan_doc, with_reasons=True, indent=1))
    skin_path = skinmap.write_skin_model(skinmap.skin_model(result), out / "skin_accessibility.vtp")
    bar(1.0, "written")
    best = {t.target: t.name for t in result.trajectories if t.rank == 1}
    summary = {"out": str(out), "trajectories": len(result.trajectories), "best": best,
               "shared_entry": result.shared_entry is not None, "failures": result.failures,
               "plan_s": round(sum(result.timings_s.values()), 2), "skin_model": skin_path}
    if hits:
        summary["hit_probability"] = {name: hits[name]["probability"] for name in best.values() if name in hits}
    print(jsonio.dumps(summary), file=sys.stdout)
    return 0

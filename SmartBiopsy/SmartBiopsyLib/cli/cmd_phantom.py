"""``smartbiopsy phantom --out DIR [--seed N] [--deformation] [--no-dicom]``: write the digital phantom case."""
from __future__ import annotations

import sys
from pathlib import Path
from SmartBiopsyCoreLib.dataio import jsonio


def register(subparsers) -> None:
    p = subparsers.add_parser("phantom", help="generate the digital phantom case (CT, mpMRI, truth)",
                              description="Generate the retroperitoneal-sarcoma phantom: planning CT, mpMRI in "
                                          "another pose, skin capsules and ground truth (NRRD + DICOM + truth.json).")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--seed", type=int, default=0, help="random seed: anatomy, pose and capsule layout (default 0)")
    p.add_argument("--deformation", action="store_true", help="add a small smooth deformation to the MRI")
    p.add_argument("--no-dicom", action="store_true", help="write NRRD only")
    p.set_defaults(func=run)


def run(args) -> int:
    from SmartBiopsyLib.cli.main import ProgressBar
    from SmartBiopsyCoreLib.errors import InputDataError
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

    if args.seed < 0:
        raise InputDataError(f"--seed must be a non-negative integer (got {args.seed})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputDataError(f"--out {out} exists and is not a folder")
    bar = ProgressBar("phantom")
    case = generate_phantom(args.seed, deformation=args.deformation, progress=lambda f, m: bar(0.8 * f, m))
    paths = case.write(out, dicom=not args.no_dicom, progress=lambda f, m: bar(0.8 + 0.2 * f, m))
    bar(1.0, "written")
    summary = {
        "out": str(out), "seed": args.seed, "tumour_volume_ml": round(case.truth.tumour_volume_ml, 1),
        "capsules": len(case.truth.capsules_ct), "ct_shape_kji": list(case.ct.shape_kji),
        "mri_shape_kji": list(case.mri["t2"].shape_kji), "files": len(paths),
        "generation_s": round(case.timings["total_s"], 1),
    }
    print(jsonio.dumps(summary), file=sys.stdout)
    return 0

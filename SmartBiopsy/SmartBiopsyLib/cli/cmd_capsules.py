"""``smartbiopsy capsules IMAGE --modality ct|mr [--json]``: find the skin capsules in a CT or an MRI."""
from __future__ import annotations

import sys
from SmartBiopsyCoreLib.dataio import jsonio


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "capsules", help="detect skin capsule markers in a CT or an anatomical MRI",
        description="Detect vitamin-oil skin capsules (about 10 x 5 mm) in a CT (HU) or a T1/T2-weighted MRI: "
                    "centres in RAS mm with sub-voxel accuracy, a confidence and the expected localisation "
                    "error per marker, and the candidates that were rejected with the reason.")
    p.add_argument("image", help="DICOM folder or volume file (NRRD, NIfTI, MetaImage)")
    p.add_argument("--modality", required=True, choices=("ct", "mr"), help="ct (Hounsfield units) or mr")
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.add_argument("--length-mm", type=float, default=None, help="capsule length if not 10 mm")
    p.add_argument("--width-mm", type=float, default=None, help="capsule diameter if not 5 mm")
    p.set_defaults(func=run)


def _load(path: str):
    try:
        from SmartBiopsyCoreLib.dataio.imageio import load_image
    except ImportError:  # pragma: no cover - imageio is part of the package; fallback for partial installs
        load_image = None
    if load_image is not None:
        return load_image(path)
    import SimpleITK as sitk

    from SmartBiopsyCoreLib.geometry import RasVolume
    from SmartBiopsyCoreLib.errors import InputDataError

    try:
        return RasVolume.from_sitk(sitk.ReadImage(str(path)), name=str(path))
    except RuntimeError as exc:
        raise InputDataError(f"cannot read the image {path}: {exc}") from None


def run(args) -> int:
    from RegistrationFusionLib.capsules.detection import detect_capsules
    from SmartBiopsyLib.cli.main import ProgressBar
    from SmartBiopsyCoreLib.errors import InputDataError

    params = {}
    for key, val in (("nominal_length_mm", args.length_mm), ("nominal_width_mm", args.width_mm)):
        if val is not None:
            if not (1.0 <= val <= 50.0):
                raise InputDataError(f"capsule size {val:g} mm is not plausible; give it in millimetres (1-50)")
            params[key] = val
    if "nominal_length_mm" in params:
        L = params["nominal_length_mm"]
        params.update(min_length_mm=0.6 * L, max_length_mm=1.6 * L)
    if "nominal_width_mm" in params:
        W = params["nominal_width_mm"]
        params.update(min_width_mm=0.5 * W, max_width_mm=1.7 * W, opening_radius_mm=max(6.0, 1.2 * W))
    volume = _load(args.image)
    from SmartBiopsyCoreLib.modality import require_ct, require_mri

    if args.modality == "ct":
        require_ct(volume, f"the image {args.image}", "pass a CT or use --modality mr for an MRI")
    else:
        require_mri(volume, f"the image {args.image}", "use --modality ct for a CT")
    bar = ProgressBar("capsules")
    det = detect_capsules(volume, args.modality, params=params or None, progress=bar)
    bar(1.0, f"{len(det)} capsules")
    if args.json:
        print(jsonio.dumps(det.to_dict(), indent=1), file=sys.stdout)
    else:
        for row in det.to_dict()["capsules"]:
            r, a, s = row["centre_ras"]
            print(f"{row['label']:>4}  R {r:8.2f}  A {a:8.2f}  S {s:8.2f} mm   confidence {row['confidence']:.2f}"
                  f"   FLE {'/'.join(f'{v:.2f}' for v in row['fle_mm'])} mm", file=sys.stdout)
        if det.rejected:
            print(f"{len(det.rejected)} candidate(s) rejected: "
                  + "; ".join(sorted({r.reason for r in det.rejected})), file=sys.stdout)
    return 0

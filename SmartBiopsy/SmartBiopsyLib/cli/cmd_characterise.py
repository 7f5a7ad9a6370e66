"""``smartbiopsy characterise``: maps, habitats, targets and radiomics from mpMRI and a tumour mask.

Writes into ``--out``: adc.nrrd, adc_qc.json (ADC fit, noise per b-value, NaN counts per reason), ff.nrrd,
ef.nrrd, ef_qc.json (how EF was made; for a DCE the baseline and post-contrast frames), habitats.nrrd
(1 A, 2 B, 3 C), regions.csv, targets.json (RAS mm), radiomics.csv (unless --no-radiomics),
characterisation.json (summary).

Grids: the ADC/DWI grid is the reference. Maps and the tumour mask from other series of the same session
(same DICOM frame of reference) are resampled onto it; from another frame of reference (or of unknown frame,
e.g. NRRD without DICOM information) they need ``--transform NAME=PATH`` (the series' world -> the DWI world,
RAS, as a smartbiopsy.transform/1 JSON or an ITK/Slicer transform file), otherwise the run stops.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)


def register(subparsers):
    from SmartBiopsyLib.cli.helptext import plain_help

    p = subparsers.add_parser("characterise", help="ADC/FF/EF maps, habitats A/B/C, targets and radiomics",
                              description=plain_help(__doc__))
    p.add_argument("--dwi", nargs="+", help="DWI DICOM folder (all b-values) or files as B=PATH (b in s/mm^2)")
    p.add_argument("--adc", help="precomputed ADC map (10^-6 mm^2/s) instead of --dwi")
    p.add_argument("--dixon-water", help="Dixon water image (DICOM folder or volume file); with --dixon-fat gives the FF map")
    p.add_argument("--dixon-fat", help="Dixon fat image (DICOM folder or volume file); with --dixon-water gives the FF map")
    p.add_argument("--ff", help="precomputed FF map (%%) instead of Dixon")
    p.add_argument("--t1-pre", help="T1-weighted image before contrast; with --t1-post gives the EF map")
    p.add_argument("--t1-post", help="T1-weighted image after contrast, same grid as --t1-pre")
    p.add_argument("--ef", help="precomputed EF map (%%) instead of T1 pre/post")
    p.add_argument("--dce", help="DCE folder (frames stored as separate DICOM series) instead of T1 pre/post")
    p.add_argument("--dce-baseline-frames", type=int, help="number of baseline frames (default: before bolus arrival)")
    p.add_argument("--dce-post-time", type=float, help="post-contrast time in s from the first frame (default: peak)")
    p.add_argument("--transform", action="append", default=[], metavar="NAME=PATH",
                   help="transform of a map from another frame of reference onto the DWI/ADC world "
                        "(NAME: ef, ff, tumour; repeatable)")
    p.add_argument("--tumour", required=True, help="tumour label map (non-zero = tumour) on the map grid")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--adc-method", choices=("ols", "wlls"), default=None,
                   help="ADC fit: ols (default; the unweighted log-linear fit over all b that scanners use) or wlls")
    p.add_argument("--adc-noise-floor", choices=("flag", "exclude"), default="flag",
                   help="flag (default): fit every b-value and count voxels at the noise floor in adc_qc.json; "
                        "exclude: leave b-values below their own image's noise floor out of that voxel's fit")
    p.add_argument("--exclude-low-b", action="store_true", help="fit ADC only on b >= 100 s/mm^2")
    p.add_argument("--mode", choices=("median", "kmeans"), default="median",
                   help="habitat thresholds: median (default; the tumour's own ADC and EF medians) or kmeans")
    p.add_argument("--predicted-tre", type=float, default=1.0, help="predicted registration TRE, RMS mm (targetable depth; the hit probability's registration error)")
    p.add_argument("--needle-error", type=float, default=None,
                   help="lateral needle placement error, RMS mm (default: the needle model's, 2 mm)")
    p.add_argument("--needle", default=None, help="needle set for the notch of the hit probability (default: the "
                   "planner's default set)")
    p.add_argument("--notch-mode", choices=("side-notch", "tip-distal"), default="side-notch",
                   help="notch region for the hit probability")
    p.add_argument("--hit-samples", type=int, default=4000,
                   help="Monte Carlo samples per candidate for the hit probability (0 = deepest point only)")
    p.add_argument("--notch-length", type=float, default=10.0, help="biopsy notch length (mm)")
    p.add_argument("--allow-unit-conversion", action="store_true",
                   help="convert ADC in mm^2/s or 10^-3 mm^2/s and FF fractions instead of stopping")
    p.add_argument("--no-radiomics", action="store_true", help="do not compute radiomic features (radiomics.csv)")
    p.set_defaults(func=run)
    return p


def _load(path):
    from SmartBiopsyCoreLib.dataio import imageio
    return imageio.load_image(path)


def _load_mri(path, option: str):
    """An MRI series (DWI, Dixon, T1) from ``path``; a CT given by mistake is refused with one sentence."""
    from SmartBiopsyCoreLib.modality import require_mri

    vol = _load(path)
    require_mri(vol, f"{option} {path}")
    return vol


def _load_dwi(items):
    if len(items) == 1 and os.path.isdir(items[0]):
        from SmartBiopsyCoreLib.dataio import dicomio
        from SmartBiopsyCoreLib.modality import require_mri

        dwi = dicomio.load_dwi_series(items[0])
        for vol in dwi.values():
            require_mri(vol, f"--dwi {items[0]}")
        return dwi
    out = {}
    for it in items:
        if "=" not in it:
            raise InputDataError(f"--dwi item {it!r} needs the form B=PATH (e.g. 800=dwi_b800.nrrd) or one DICOM folder")
        b, path = it.split("=", 1)
        try:
            bv = float(b)
        except ValueError:
            raise InputDataError(f"--dwi item {it!r}: {b!r} is not a b-value in s/mm^2") from None
        v = _load_mri(path, "--dwi")
        v.meta["b_value"] = bv
        out[bv] = v
    return out


def _load_transforms(items) -> dict:
    """{name: 4x4 RAS} from NAME=PATH items (smartbiopsy.transform/1 JSON or an ITK/Slicer transform file)."""
    from SmartBiopsyCoreLib.dataio.transforms import load_mri_to_ct

    out = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or name not in ("ef", "ff", "tumour"):
            raise InputDataError(f"--transform {it!r} needs the form NAME=PATH with NAME one of ef, ff, tumour")
        out[name] = load_mri_to_ct(path)
    return out


def run(args) -> int:
    from SmartBiopsyLib.characterise import habitats, maps, targets, tumour
    from SmartBiopsyCoreLib.dataio import imageio
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tumour_vol = _load(args.tumour)
    transforms = _load_transforms(args.transform)
    if args.adc:
        adc = maps.check_adc_units(_load(args.adc), allow_convert=args.allow_unit_conversion)
    elif args.dwi:
        adc = maps.compute_adc(_load_dwi(args.dwi), method=args.adc_method or maps.DEFAULT_ADC_METHOD,
                               exclude_low_b=args.exclude_low_b, noise_floor=args.adc_noise_floor)
    else:
        raise InputDataError("give either --dwi (DWI with at least two b-values) or a precomputed --adc map")
    moved, how = maps.to_common_grid({"tumour": tumour_vol}, adc, transforms, labels=("tumour",))
    tumour_vol = moved["tumour"]
    mask = np.asarray(tumour_vol.array) != 0
    if args.ff:
        ff = _load(args.ff)
    elif args.dixon_water and args.dixon_fat:
        ff = maps.compute_ff(_load_mri(args.dixon_water, "--dixon-water"),
                             _load_mri(args.dixon_fat, "--dixon-fat"))
    else:
        ff = None
        logger.warning("no FF map or Dixon images: fat inside the tumour cannot be excluded")
    if args.ef:
        ef = _load(args.ef)
    elif args.dce:
        dce = imageio.load_time_series(args.dce, "DCE")
        ef = maps.compute_ef_dynamic(dce.frames, dce.times_s, baseline_frames=args.dce_baseline_frames,
                                     post_time_s=args.dce_post_time)
        print(f"note: EF from the DCE {dce.label}: {ef.meta['dynamic_sentence']}")
    elif args.t1_pre and args.t1_post:
        ef = maps.compute_ef(_load_mri(args.t1_pre, "--t1-pre"), _load_mri(args.t1_post, "--t1-post"))
    else:
        raise InputDataError("give --t1-pre and --t1-post, a --dce folder or a precomputed --ef map")
    moved, moved_how = maps.to_common_grid({"ef": ef} | ({"ff": ff} if ff is not None else {}), adc, transforms)
    how |= moved_how
    ef, ff = moved["ef"], moved.get("ff")
    if args.ef:
        ef = maps.check_percent_map(ef, "EF", mask)
    if args.ff:
        ff = maps.check_percent_map(ff, "FF", mask, allow_convert=args.allow_unit_conversion)
    for name, h in how.items():
        if h != "same grid":
            print(f"note: {name} {h} onto the ADC grid")
    named = {"adc": adc, "ef": ef} | ({"ff": ff} if ff is not None else {})
    for name, v in named.items():
        imageio.save_image(v, out / f"{name}.nrrd")
    maps.write_adc_qc(adc, out / "adc_qc.json")
    maps.write_ef_qc(ef, out / "ef_qc.json")
    size = tumour.measure_tumour(tumour_vol)
    res = habitats.compute_habitats(adc, ef, ff, mask, habitats.HabitatConfig(mode=args.mode))
    imageio.save_image(res.labels, out / "habitats.nrrd")
    habitats.write_regions_csv(res, out / "regions.csv")
    if args.hit_samples and args.hit_samples < 100:
        raise InputDataError("--hit-samples must be 0 (deepest point only) or at least 100")
    ts = targets.plan_targets(res.labels, named, args.predicted_tre, args.needle_error, args.notch_length,
                              needle=args.needle, notch_mode=args.notch_mode, hit_samples=args.hit_samples)
    targets.write_targets_json(ts, out / "targets.json")
    if not args.no_radiomics:
        from SmartBiopsyLib.characterise import radiomics as radiomics_features
        radiomics_features.write_radiomics_csv(radiomics_features.compute_radiomics(res.labels, named),
                                               out / "radiomics.csv")
    summary = {"tumour": size.to_dict(), "habitats": res.to_dict(), "targets": [t.to_dict() for t in ts],
               "grids": how, "adc_qc": maps.adc_qc(adc)}
    (out / "characterisation.json").write_text(jsonio.dumps(summary, with_reasons=True, indent=2, default=float))
    for msg in list(res.missing.values()) + size.notes:
        print(f"note: {msg}")
    for t in ts:
        print(f"{t.name}: RAS {np.round(t.point_ras, 1).tolist()} depth {t.depth_mm:.1f} mm"
              + ("" if t.targetable else " (NOT safely targetable)")
              + ("" if t.hit_probability is None else
                 f", hit probability {100 * t.hit_probability:.0f}% (MC SE {100 * t.hit_probability_se:.1f} pp)"))
    if ts and ts[0].hit_probability is not None:
        print(f"note: hit probability = {ts[0].hit_definition}; {ts[0].hit_model['direction_source']}")
    return 0

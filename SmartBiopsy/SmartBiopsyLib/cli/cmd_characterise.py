"""``smartbiopsy characterise``: maps, habitats, targets and radiomics from mpMRI and a tumour mask.

Writes into ``--out``: adc.nrrd, ff.nrrd, ef.nrrd, habitats.nrrd (1 A, 2 B, 3 C), regions.csv,
targets.json (RAS mm), radiomics.csv (unless --no-radiomics), characterisation.json (summary).
All inputs must be on one grid (the ADC/DWI grid); the tumour mask too.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from SmartBiopsyCoreLib.errors import InputDataError

logger = logging.getLogger(__name__)


def register(subparsers):
    p = subparsers.add_parser("characterise", help="ADC/FF/EF maps, habitats A/B/C, targets and radiomics",
                              description=__doc__)
    p.add_argument("--dwi", nargs="+", help="DWI DICOM folder (all b-values) or files as B=PATH (b in s/mm^2)")
    p.add_argument("--adc", help="precomputed ADC map (10^-6 mm^2/s) instead of --dwi")
    p.add_argument("--dixon-water")
    p.add_argument("--dixon-fat")
    p.add_argument("--ff", help="precomputed FF map (%%) instead of Dixon")
    p.add_argument("--t1-pre")
    p.add_argument("--t1-post")
    p.add_argument("--ef", help="precomputed EF map (%%) instead of T1 pre/post")
    p.add_argument("--tumour", required=True, help="tumour label map (non-zero = tumour) on the map grid")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--adc-method", choices=("wlls", "ols"), default="wlls")
    p.add_argument("--exclude-low-b", action="store_true", help="fit ADC only on b >= 100 s/mm^2")
    p.add_argument("--mode", choices=("median", "kmeans"), default="median")
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
    p.add_argument("--no-radiomics", action="store_true")
    p.set_defaults(func=run)
    return p


def _load(path):
    from SmartBiopsyCoreLib.dataio import imageio
    return imageio.load_image(path)


def _load_dwi(items):
    if len(items) == 1 and os.path.isdir(items[0]):
        from SmartBiopsyCoreLib.dataio import dicomio
        return dicomio.load_dwi_series(items[0])
    out = {}
    for it in items:
        if "=" not in it:
            raise InputDataError(f"--dwi item {it!r} needs the form B=PATH (e.g. 800=dwi_b800.nrrd) or one DICOM folder")
        b, path = it.split("=", 1)
        try:
            bv = float(b)
        except ValueError:
            raise InputDataError(f"--dwi item {it!r}: {b!r} is not a b-value in s/mm^2") from None
        v = _load(path)
        v.meta["b_value"] = bv
        out[bv] = v
    return out


def run(args) -> int:
    from SmartBiopsyLib.characterise import habitats, maps, targets, tumour
    from SmartBiopsyCoreLib.dataio import imageio
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tumour_vol = _load(args.tumour)
    if args.adc:
        adc = maps.check_adc_units(_load(args.adc), allow_convert=args.allow_unit_conversion)
    elif args.dwi:
        adc = maps.compute_adc(_load_dwi(args.dwi), method=args.adc_method, exclude_low_b=args.exclude_low_b)
    else:
        raise InputDataError("give either --dwi (DWI with at least two b-values) or a precomputed --adc map")
    mask = np.asarray(tumour_vol.array) != 0
    if tumour_vol.array.shape != adc.array.shape:
        raise InputDataError("the tumour mask is not on the ADC/DWI grid; resample it onto that grid first")
    if args.ff:
        ff = maps.check_percent_map(_load(args.ff), "FF", mask, allow_convert=args.allow_unit_conversion)
    elif args.dixon_water and args.dixon_fat:
        ff = maps.compute_ff(_load(args.dixon_water), _load(args.dixon_fat))
    else:
        ff = None
        logger.warning("no FF map or Dixon images: fat inside the tumour cannot be excluded")
    if args.ef:
        ef = maps.check_percent_map(_load(args.ef), "EF", mask)
    elif args.t1_pre and args.t1_post:
        ef = maps.compute_ef(_load(args.t1_pre), _load(args.t1_post))
    else:
        raise InputDataError("give either --t1-pre and --t1-post or a precomputed --ef map")
    named = {"adc": adc, "ef": ef} | ({"ff": ff} if ff is not None else {})
    maps.align_to_reference(named, adc)  # same grid or a clear error
    for name, v in named.items():
        imageio.save_image(v, out / f"{name}.nrrd")
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
    summary = {"tumour": size.to_dict(), "habitats": res.to_dict(), "targets": [t.to_dict() for t in ts]}
    (out / "characterisation.json").write_text(json.dumps(summary, indent=2, default=float))
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

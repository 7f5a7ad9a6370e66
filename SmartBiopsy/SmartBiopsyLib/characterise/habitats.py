"""Tumour habitats A, B, C from ADC, EF and FF maps (all on one grid; ADC in 10^-6 mm^2/s, EF/FF in %).

Published median rule (``mode="median"``): relative to the whole-tumour medians of ADC and EF over the
*solid* tumour, A = ADC below the median AND EF above it (cellular, enhancing), C = ADC above AND EF below
(hypocellular, poorly enhancing), B = the two discordant quadrants.

Non-solid tissue is excluded first (configurable, :class:`HabitatConfig`): necrosis/cyst = ADC above
``necrosis_adc_min`` (2500) without enhancement (EF below ``necrosis_ef_max``, 10 %); fat = FF above
``fat_ff_min`` (50 %); voxels where any map is NaN/inf are excluded and counted.

Regularisation: the maps are smoothed inside the solid tumour only (normalised Gaussian convolution,
``smooth_sigma_mm``, so necrosis does not bleed into its neighbours), connected islands smaller than
``island_min_ml`` are given the label of the nearest larger region, and a region whose total volume is
under ``min_region_ml`` is reported missing (with the reason) and left out; the others are still returned.

Data-driven mode (``mode="kmeans"``): k-means (best of ``n_init`` runs) on the smoothed (ADC, EF, FF) of the
solid voxels, robustly standardised (median, 10-90 % range, clipped to +-3), with five clusters by default (one more
than the four ADC/EF quadrants of the median rule, two concordant and two discordant, so that boundary and partial-volume voxels do not
force two compartments into one cluster); each cluster is labelled A/B/C by where its mean signature falls
relative to the same medians.

Output labels: 0 outside / excluded, 1 A, 2 B, 3 C.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

from SmartBiopsyCoreLib.geometry import RasVolume
from SmartBiopsyCoreLib.errors import InputDataError, SmartBiopsyError

logger = logging.getLogger(__name__)

REGION_CODES = {"A": 1, "B": 2, "C": 3}
REGION_NAMES = {v: k for k, v in REGION_CODES.items()}


@dataclass
class HabitatConfig:
    """Parameters of the habitat map (units: 10^-6 mm^2/s, %, mm, ml)."""

    mode: str = "median"  # "median" (published rule) or "kmeans"
    necrosis_adc_min: float = 2500.0
    necrosis_ef_max: float = 10.0
    fat_ff_min: float = 50.0
    smooth_sigma_mm: float = 2.0  # 0 disables smoothing
    island_min_ml: float = 0.2
    min_region_ml: float = 1.0
    n_clusters: int = 5
    n_init: int = 4
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RegionStats:
    """Signature and size of one habitat region (raw, unsmoothed map values)."""

    region: str
    code: int
    voxel_count: int
    volume_ml: float
    adc_mean: float
    adc_sd: float
    ef_mean: float
    ef_sd: float
    ff_mean: float
    ff_sd: float
    adc_median_threshold: float
    ef_median_threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HabitatResult:
    labels: RasVolume
    regions: list[RegionStats]
    thresholds: dict
    excluded: dict  # voxel counts: necrosis, fat, invalid
    missing: dict = field(default_factory=dict)  # region -> reason
    config: HabitatConfig = field(default_factory=HabitatConfig)

    def to_dict(self) -> dict:
        return {"regions": [r.to_dict() for r in self.regions], "thresholds": self.thresholds,
                "excluded_voxels": self.excluded, "missing": self.missing, "config": self.config.to_dict(),
                "label_codes": REGION_CODES}


def _check_maps(adc: RasVolume, ef: RasVolume, ff: RasVolume | None, mask: np.ndarray):
    for name, v in (("EF", ef), ("FF", ff)):
        if v is not None and not v.same_grid(adc):
            raise InputDataError(f"the {name} map is not on the ADC map's grid; resample the maps onto one grid "
                                 "(maps.align_to_reference with the registration transform) first")
    if mask.shape != adc.array.shape:
        raise InputDataError("the tumour mask is not on the maps' grid; resample it onto the ADC grid first")
    if not mask.any():
        raise InputDataError("the tumour mask is empty; segment the tumour before computing habitats")


def _smooth_inside(arr: np.ndarray, inside: np.ndarray, sigma_vox) -> np.ndarray:
    """Normalised Gaussian smoothing of ``arr`` using only ``inside`` voxels (others keep NaN)."""
    w = inside.astype(np.float64)
    a = np.where(inside, arr, 0.0)
    num = ndimage.gaussian_filter(a, sigma_vox, mode="constant")
    den = ndimage.gaussian_filter(w, sigma_vox, mode="constant")
    out = np.full(arr.shape, np.nan)
    ok = inside & (den > 1e-6)
    out[ok] = num[ok] / den[ok]
    return out


def _crop(mask: np.ndarray, margin: int = 3):
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _remove_islands(labels: np.ndarray, solid: np.ndarray, min_voxels: int) -> np.ndarray:
    """Relabel connected components smaller than ``min_voxels`` with the nearest kept label."""
    if min_voxels <= 1:
        return labels
    keep = np.zeros(labels.shape, bool)
    for code in (1, 2, 3):
        lab, n = ndimage.label(labels == code)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        big = sizes >= min_voxels
        big[0] = False
        keep |= big[lab]
    if not keep.any():
        return labels
    _, idx = ndimage.distance_transform_edt(~keep, return_indices=True)
    nearest = labels[tuple(idx)]
    out = np.where(keep, labels, nearest)
    out[~solid] = 0
    return out


def _stats(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def compute_habitats(adc: RasVolume, ef: RasVolume, ff: RasVolume | None, tumour: RasVolume | np.ndarray,
                     config: HabitatConfig | None = None, progress: Callable | None = None,
                     should_cancel: Callable | None = None) -> HabitatResult:
    """Habitat label map (RAS grid of ``adc``; 1 A, 2 B, 3 C) and region table; see the module docstring.

    ``tumour``: label volume (non-zero = tumour) or boolean array on the ADC grid. ``ff`` may be None (no fat
    exclusion). Raises :class:`InputDataError` for mismatched grids, an empty tumour or no solid tissue.
    """
    cfg = config or HabitatConfig()
    if cfg.mode not in ("median", "kmeans"):
        raise ValueError(f"unknown habitat mode {cfg.mode!r}; use 'median' or 'kmeans'")
    if isinstance(tumour, RasVolume):
        if not tumour.same_grid(adc):
            raise InputDataError("the tumour mask is not on the maps' grid; resample it onto the ADC grid first")
        mask = np.asarray(tumour.array) != 0
    else:
        mask = np.asarray(tumour, bool)
    _check_maps(adc, ef, ff, mask)
    if progress:
        progress(0.05, "excluding non-solid tissue")
    sl = _crop(mask)
    m = mask[sl]
    a = np.asarray(adc.array, np.float64)[sl]
    e = np.asarray(ef.array, np.float64)[sl]
    f = np.asarray(ff.array, np.float64)[sl] if ff is not None else np.zeros_like(a)
    finite = np.isfinite(a) & np.isfinite(e) & np.isfinite(f)
    invalid = m & ~finite
    necrosis = m & finite & (a > cfg.necrosis_adc_min) & (e < cfg.necrosis_ef_max)
    fat = m & finite & ~necrosis & (f > cfg.fat_ff_min) if ff is not None else np.zeros_like(m)
    solid = m & finite & ~necrosis & ~fat
    excluded = {"necrosis": int(necrosis.sum()), "fat": int(fat.sum()), "invalid": int(invalid.sum()),
                "solid": int(solid.sum()), "tumour": int(m.sum())}
    if invalid.any():
        logger.warning("%d tumour voxels have NaN/inf in a map (outside the maps' signal mask); they are excluded",
                       invalid.sum())
    if solid.sum() < 10:
        raise InputDataError(f"the tumour has no solid tissue to characterise ({excluded['necrosis']} necrotic, "
                             f"{excluded['fat']} fatty, {excluded['invalid']} invalid voxels of {excluded['tumour']}); "
                             "check the maps and the exclusion thresholds")
    if should_cancel and should_cancel():
        raise SmartBiopsyError("habitat computation was cancelled by the user")
    sigma_vox = np.asarray(cfg.smooth_sigma_mm, float) / adc.spacing[::-1]
    if cfg.smooth_sigma_mm > 0:
        a_s, e_s, f_s = (_smooth_inside(x, solid, sigma_vox) for x in (a, e, f))
    else:
        a_s, e_s, f_s = (np.where(solid, x, np.nan) for x in (a, e, f))
    adc_med = float(np.median(a[solid]))
    ef_med = float(np.median(e[solid]))
    if progress:
        progress(0.3, f"classifying ({cfg.mode})")
    labels = np.zeros(m.shape, np.uint8)
    if cfg.mode == "median":
        low_adc = a_s < adc_med
        high_ef = e_s > ef_med
        labels[solid] = 2
        labels[solid & low_adc & high_ef] = 1
        labels[solid & ~low_adc & ~high_ef] = 3
    else:
        from scipy.cluster.vq import kmeans2

        feats = np.stack([a_s[solid], e_s[solid]] + ([f_s[solid]] if ff is not None else []), axis=1)
        # robust standardisation (median, 10-90 % range) and clipping: a few partial-volume fat or necrosis
        # voxels must not own a cluster of their own
        med = np.median(feats, axis=0)
        q10, q90 = np.percentile(feats, [10, 90], axis=0)
        scale = np.where(q90 > q10, (q90 - q10) / 2.563, 1.0)
        z = np.clip((feats - med) / scale, -3.0, 3.0)
        k = int(min(cfg.n_clusters, len(z)))
        best = None
        for r in range(max(cfg.n_init, 1)):
            cent, lab_ = kmeans2(z, k, minit="++", seed=cfg.seed + r)
            inertia = float(((z - cent[lab_]) ** 2).sum())
            if best is None or inertia < best[0]:
                best = (inertia, lab_)
        assign = best[1]
        centre = np.array([feats[assign == c].mean(axis=0) if np.any(assign == c) else np.full(feats.shape[1], np.nan)
                           for c in range(k)])
        code = np.where((centre[:, 0] < adc_med) & (centre[:, 1] > ef_med), 1,
                        np.where((centre[:, 0] >= adc_med) & (centre[:, 1] <= ef_med), 3, 2)).astype(np.uint8)
        labels[solid] = code[assign]
        logger.info("k-means centres (ADC, EF%s): %s -> %s", ", FF" if ff is not None else "",
                    np.round(centre, 1).tolist(), [REGION_NAMES[int(c)] for c in code])
    island_vox = int(round(cfg.island_min_ml * 1000.0 / adc.voxel_volume_mm3))
    labels = _remove_islands(labels, solid, island_vox)
    if progress:
        progress(0.8, "region statistics")
    regions, missing = [], {}
    vox_ml = adc.voxel_volume_mm3 / 1000.0
    for name, code in REGION_CODES.items():
        sel = labels == code
        vol_ml = float(sel.sum() * vox_ml)
        if sel.sum() == 0 or vol_ml < cfg.min_region_ml:
            reason = {"A": "no solid tissue has both ADC below and EF above the tumour medians",
                      "B": "no solid tissue has discordant ADC and EF",
                      "C": "no solid tissue has both ADC above and EF below the tumour medians"}[name]
            missing[name] = (f"region {name} is {'absent' if sel.sum() == 0 else f'only {vol_ml:.2f} ml'} "
                             f"(minimum {cfg.min_region_ml:g} ml): {reason} "
                             f"(ADC median {adc_med:.0f}, EF median {ef_med:.0f}%)")
            labels[sel] = 0
            logger.warning(missing[name])
            continue
        st = [_stats(x[sel]) for x in (a, e, f)]
        regions.append(RegionStats(name, code, int(sel.sum()), vol_ml, st[0][0], st[0][1], st[1][0], st[1][1],
                                   st[2][0] if ff is not None else float("nan"),
                                   st[2][1] if ff is not None else float("nan"), adc_med, ef_med))
    full = np.zeros(mask.shape, np.uint8)
    full[sl] = labels
    out = RasVolume(full, adc.ijk_to_ras.copy(), "Habitats",
                    {"label_codes": REGION_CODES, "mode": cfg.mode, "adc_median": adc_med, "ef_median": ef_med})
    if progress:
        progress(1.0, "habitats done")
    return HabitatResult(out, regions, {"adc_median": adc_med, "ef_median": ef_med}, excluded, missing, cfg)


def write_regions_csv(result: HabitatResult, path) -> None:
    """One row per present region (:class:`RegionStats` fields); an empty file when no region is present."""
    import csv

    rows = [r.to_dict() for r in result.regions]
    with open(path, "w", newline="") as fh:
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

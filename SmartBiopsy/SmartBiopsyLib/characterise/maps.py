"""Quantitative MRI maps for tumour characterisation: ADC, fat fraction (FF) and enhancement fraction (EF).

All maps are ``RasVolume`` objects on ONE grid (the grid of the first input); voxels where a map cannot be
computed (background, non-finite or non-positive input) are NaN. Units:

* ADC in 10^-6 mm^2/s (as scanners store it), from multi-b DWI by a log-linear least-squares fit
  ``ln S(b) = ln S0 - b * ADC``. ``method="ols"`` (default) is the unweighted fit over all b-values that
  scanners use for their own ADC map (``adc_scanner`` oracle, Testing/core/test_adc_real.py);
  ``method="wlls"`` weights each point by S(b)^2 (reads 7-10 % above scanner maps on real prostate DWI).
  Each b-value image's noise floor comes from its own noise estimate; NaN only where the fit is undefined,
  counted per reason (:func:`adc_qc`, written as adc_qc.json).
* FF in percent: ``100 * F / (W + F)`` from magnitude Dixon water and fat images.
  Swap handling: a *global* water/fat swap (the two series labelled the wrong way round, or the whole
  reconstruction choosing the wrong solution) is detected from the subcutaneous fat shell: in a correctly
  labelled study the outer ~10 mm of the body is mostly fat, so its median FF is > 50 %. When it is below
  50 % the study is reported as swapped (``meta["swap_detected"]``) and, by default, the two images are
  exchanged with a warning (``on_swap="correct"``; ``"raise"`` stops, ``"ignore"`` keeps them).
  Per-voxel swaps of magnitude Dixon cannot be detected from magnitudes alone: a magnitude pair cannot
  tell FF from 100 - FF in one voxel, so local swaps (field-inhomogeneity artefacts at the edge of the
  field of view) remain and must be checked visually.
* EF in percent: ``100 * (post - pre) / pre`` from pre- and post-contrast T1 (same sequence and scaling), or
  from a DCE time series (:func:`compute_ef_dynamic`: baseline frames before bolus arrival, peak or chosen
  post-contrast frame, both stated in ``meta``); tissue from the post-contrast / maximum-over-time signal.

Long functions accept ``progress(fraction, message)`` and ``should_cancel()`` (both optional).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
from scipy import ndimage

from SmartBiopsyCoreLib.geometry import RasVolume, resample
from SmartBiopsyCoreLib.errors import CancelledError, InputDataError, SmartBiopsyError  # noqa: F401
from SmartBiopsyCoreLib.progress import check_cancel, report
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)

ADC_UNITS = "1e-6 mm^2/s"
PERCENT = "%"


def _report(progress, fraction, message):
    report(progress, fraction, message)


def _check_cancel(should_cancel):
    check_cancel(should_cancel, "map computation")


# -------------------------------------------------------------------------------------------------
# grids
# -------------------------------------------------------------------------------------------------
def align_to_reference(volumes: Mapping[str, RasVolume], reference: RasVolume,
                       transforms: Mapping[str, np.ndarray] | None = None, order: int = 1) -> dict[str, RasVolume]:
    """Bring every volume onto ``reference``'s grid.

    A volume already on the grid is returned unchanged; otherwise it is resampled with
    ``geometry.resample`` when ``transforms[name]`` (4x4 RAS, moving world -> reference world; identity
    allowed) is given, and an :class:`InputDataError` is raised when it is not: silently resampling
    series of different studies would mix unregistered data.
    """
    transforms = dict(transforms or {})
    out = {}
    for name, vol in volumes.items():
        if vol.same_grid(reference):
            out[name] = vol
        elif name in transforms:
            t = transforms[name]
            out[name] = resample(vol, reference, None if t is None else np.asarray(t, float), order=order, fill=np.nan)
            logger.info("resampled %s onto the grid of %s", name, reference.name)
        else:
            raise InputDataError(
                f"'{name}' is not on the same voxel grid as '{reference.name}' (shape {vol.array.shape} vs "
                f"{reference.array.shape}); register it first or pass its transform so it can be resampled")
    return out


FRAME_KEY = "frame_of_reference_uid"


def _frame_meta(ref: RasVolume) -> dict:
    """The DICOM frame of reference of ``ref`` (if known), for the meta of a map computed on its grid."""
    f = (ref.meta or {}).get(FRAME_KEY)
    return {FRAME_KEY: f} if f else {}


def to_common_grid(volumes: Mapping[str, RasVolume], reference: RasVolume,
                   transforms: Mapping[str, np.ndarray] | None = None, labels: tuple = ()) -> tuple[dict, dict]:
    """Bring maps from different series of one session onto ``reference``'s grid.

    Per volume: on the grid already -> unchanged; ``transforms[name]`` given (4x4 RAS, that volume's world
    -> reference world) -> resampled with it; same DICOM frame of reference as ``reference`` (meta
    ``frame_of_reference_uid``: one scanner session, one patient position) -> resampled in place (identity).
    A different or unknown frame of reference without a transform raises :class:`InputDataError`: series of
    two sessions are not aligned. Linear interpolation, NaN outside; nearest neighbour for ``labels``.
    Returns ``(volumes on the reference grid, {name: how})``.
    """
    transforms = dict(transforms or {})
    f_ref = (reference.meta or {}).get(FRAME_KEY)
    out, how = {}, {}
    for name, vol in volumes.items():
        if vol is None:
            continue
        if vol.same_grid(reference, tol=1e-3):
            out[name], how[name] = vol, "same grid"
            continue
        order = 0 if name in labels else 1
        fill = 0 if name in labels else np.nan
        f = (vol.meta or {}).get(FRAME_KEY)
        if name in transforms:
            t = transforms[name]
            out[name] = resample(vol, reference, None if t is None else np.asarray(t, float), order=order, fill=fill)
            how[name] = "resampled with the given transform"
        elif f and f_ref and f == f_ref:
            out[name] = resample(vol, reference, None, order=order, fill=fill)
            how[name] = "resampled (same frame of reference)"
        elif f and f_ref:
            raise InputDataError(
                f"'{name}' comes from another frame of reference than '{reference.name}' (another session or "
                f"patient position), so it cannot simply be resampled; register it and pass its transform")
        else:
            raise InputDataError(
                f"'{name}' is not on the voxel grid of '{reference.name}' and its frame of reference is unknown "
                f"(not read from DICOM), so it cannot be resampled safely; pass its transform (identity if both "
                f"series come from one session) or load both from DICOM")
        out[name].meta["resampled_onto"] = reference.name
        logger.info("%s: %s onto the grid of %s", name, how[name], reference.name)
    return out, how


# -------------------------------------------------------------------------------------------------
# masks and noise
# -------------------------------------------------------------------------------------------------
def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu threshold of a 1-D sample (same units as ``values``)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0 or v.min() == v.max():
        return float(v.min()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[1:][np.argmax(between[:-1])])


def signal_mask(image: RasVolume | np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Boolean mask of voxels with signal clearly above the background.

    ``threshold`` in the image's intensity units; by default Otsu's threshold on log(1 + signal) of the
    positive voxels, which separates air/noise from tissue even when most of the field of view is body.
    Small specks (< 10 voxels) are removed.
    """
    arr = np.asarray(image.array if isinstance(image, RasVolume) else image, float)
    finite = np.isfinite(arr)
    if threshold is None:
        pos = arr[finite & (arr > 0)]
        if pos.size == 0:
            return np.zeros(arr.shape, bool)
        # a single intensity level (synthetic or already masked images): everything positive is signal
        threshold = 0.0 if pos.min() == pos.max() else float(np.expm1(otsu_threshold(np.log1p(pos))))
    mask = finite & (arr > threshold)
    lab, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        small = sizes < 10
        small[0] = False
        mask[small[lab]] = False
    return mask


def estimate_noise_sigma(image: np.ndarray, background: np.ndarray) -> float:
    """Noise standard deviation (image units) from magnitude background voxels.

    Magnitude noise in air is Rayleigh-distributed, whose mode equals sigma. The mode of the histogram is
    used (not the mean) because a "background" taken below a threshold also holds dark tissue
    (fat-suppressed fat, bone, air-filled bowel), which would inflate mean-based estimates. Returns 0 when
    there are too few background voxels.
    """
    v = np.asarray(image, float)[np.asarray(background, bool)]
    v = v[np.isfinite(v) & (v > 0)]
    if v.size < 50:
        return 0.0
    hi = float(np.percentile(v, 90))
    if hi <= 0:
        return 0.0
    width = max(hi / 100.0, 1.0 if np.allclose(v, np.round(v)) else 0.0) or hi / 100.0
    hist, edges = np.histogram(v, bins=np.arange(0.0, hi + width, width))
    hist = ndimage.uniform_filter1d(hist.astype(float), 3)
    k = int(np.argmax(hist))
    return float(0.5 * (edges[k] + edges[k + 1]))


# -------------------------------------------------------------------------------------------------
# ADC
# -------------------------------------------------------------------------------------------------
def _b_of(key, vol: RasVolume) -> float:
    b = vol.meta.get("b_value", key)
    try:
        return float(b)
    except (TypeError, ValueError) as exc:
        raise InputDataError(f"the DWI series '{vol.name}' has no usable b-value ({b!r}); give b-values in s/mm^2") from exc


#: The ADC fit every product path uses (``characterise``, ``run``, ``demo``, the SmartBiopsy module) and the
#: real-data oracle test checks: the unweighted log-linear fit over all b-values that scanners use.
DEFAULT_ADC_METHOD = "ols"
#: Noise-floor handling: "flag" (default) fits every b-value like the scanner and counts the voxels whose
#: highest-b signal is at the noise floor; "exclude" leaves such points out of that voxel's fit.
NOISE_FLOOR_MODES = ("flag", "exclude")
#: Reasons a voxel of the ADC map is NaN (keys of ``meta["nan_reasons"]`` and of adc_qc.json).
ADC_NAN_REASONS = ("no_signal", "non_finite_input", "non_positive_signal", "too_few_b_above_noise_floor")


def _per_b_sigma(noise_sigma, b: np.ndarray, stack: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Noise sigma of every b-value image (image units), each from ITS OWN background voxels.

    ``noise_sigma``: None (estimate), one number (the user's value for every image) or ``{b: sigma}``.
    """
    if noise_sigma is None:
        return np.array([estimate_noise_sigma(stack[k], background) for k in range(len(b))])
    if isinstance(noise_sigma, Mapping):
        try:
            return np.array([float(next(v for k, v in noise_sigma.items() if abs(float(k) - bv) < 0.5))
                             for bv in b])
        except StopIteration:
            raise InputDataError(f"a noise sigma is needed for every b-value {[float(x) for x in b]}; "
                                 f"only {sorted(map(float, noise_sigma))} were given") from None
    return np.full(len(b), float(noise_sigma))


def compute_adc(dwi: Mapping[float, RasVolume], method: str = DEFAULT_ADC_METHOD, exclude_low_b: bool = False,
                low_b_threshold: float = 100.0, mask: np.ndarray | None = None, min_snr: float = 2.0,
                noise_sigma: float | Mapping[float, float] | None = None,
                transforms: Mapping[float, np.ndarray] | None = None, noise_floor: str = "flag",
                progress: Callable | None = None, should_cancel: Callable | None = None) -> RasVolume:
    """ADC map (10^-6 mm^2/s) from magnitude DWI ``{b [s/mm^2]: RasVolume}`` by log-linear least squares.

    * ``method``: ``"ols"`` (default; unweighted over all b, the fit scanners use for their ADC map, checked
      against the PROSTATEx scanner map) or ``"wlls"`` (weights S^2 of the measured signal).
    * ``exclude_low_b``: drop b < ``low_b_threshold`` (perfusion-weighted points); at least two distinct
      b-values must remain.
    * Signal: ``mask`` (bool, same grid) or :func:`signal_mask` of the lowest-b image; voxels outside are NaN.
    * Noise floor: the sigma of EVERY b-value image is estimated from that image's own background voxels
      (or given: one number or ``{b: sigma}``); its floor is ``min_snr * sigma_b``. ``noise_floor="flag"``
      (default) keeps every point in the fit and counts voxels whose highest-b signal is below its floor
      (``meta["voxels_highest_b_at_noise_floor"]``: their ADC is biased low by the Rician floor);
      ``"exclude"`` leaves points below their own image's floor out of that voxel's fit, NaN when fewer
      than two b-values remain. A floor is never applied to another b-value's image.
    * NaN only where the fit is undefined; ``meta["nan_reasons"]`` counts the voxels per reason
      (:data:`ADC_NAN_REASONS`, each voxel counted once, first reason wins). See :func:`adc_qc`.
    * Grids: all series must share the grid of the lowest b, unless ``transforms[b]`` is given.

    Returns a float32 ``RasVolume`` on the lowest-b grid with ``meta`` holding units, method, b-values,
    per-b noise sigma and voxel counts. Negative fitted ADC values (noise) are kept so that statistics are
    unbiased; values are clipped to [-1000, 5000] (``meta["voxels_clipped"]``).
    """
    if method not in ("wlls", "ols"):
        raise ValueError(f"unknown ADC fit method {method!r}; use 'wlls' or 'ols'")
    if noise_floor not in NOISE_FLOOR_MODES:
        raise ValueError(f"unknown noise-floor mode {noise_floor!r}; use one of {NOISE_FLOOR_MODES}")
    if not dwi:
        raise InputDataError("no diffusion-weighted series were given; load a DWI series with at least two b-values")
    items = sorted(((_b_of(k, v), v) for k, v in dwi.items()), key=lambda t: t[0])
    bvals = [b for b, _ in items]
    if any(b < 0 for b in bvals):
        raise InputDataError(f"negative b-values {bvals} found; check the DWI series' b-value tags")
    if len(set(bvals)) != len(bvals):
        raise InputDataError(f"the b-value list {bvals} contains duplicates; average repeated acquisitions first")
    if exclude_low_b:
        items = [(b, v) for b, v in items if b >= low_b_threshold]
    if len(items) < 2:
        raise InputDataError(
            f"an ADC needs at least two different b-values but only {[b for b, _ in items]} s/mm^2 "
            f"{'remain after excluding b < %g' % low_b_threshold if exclude_low_b else 'were given'}; "
            "load the full DWI series (or do not exclude low b-values)")
    b = np.array([bv for bv, _ in items], float)
    ref = items[0][1]
    vols = align_to_reference({bv: v for bv, v in items}, ref, transforms)
    _report(progress, 0.05, "checking DWI signal")
    stack = np.stack([np.asarray(vols[bv].array, np.float32) for bv in b])
    finite = np.isfinite(stack).all(axis=0)
    if np.any(stack[:, finite] < 0):
        n = int(np.sum(stack[:, finite] < 0))
        raise InputDataError(
            f"the DWI contains {n} negative signal values; magnitude images are required (this looks like a "
            "phase, subtracted or wrongly rescaled series)")
    lowest = np.where(np.isfinite(stack[0]), stack[0], 0)
    if not np.any(lowest > 0):
        raise InputDataError(f"the b={b[0]:g} image is empty (all zero); the DWI series is corrupt or truncated")

    body = signal_mask(lowest) if mask is None else np.asarray(mask, bool)
    if body.shape != lowest.shape:
        raise InputDataError("the ADC mask does not match the DWI grid; use a mask on the DWI grid")
    background = ~signal_mask(lowest) & finite
    sigma = _per_b_sigma(noise_sigma, b, stack, background)
    floor = min_snr * sigma if min_snr > 0 else np.zeros_like(sigma)
    positive = (stack > 0).all(axis=0)
    reasons = {"no_signal": ~body, "non_finite_input": body & ~finite,
               "non_positive_signal": body & finite & ~positive}
    valid = body & finite & positive
    _check_cancel(should_cancel)
    _report(progress, 0.2, f"fitting ADC ({method.upper()}, b = {', '.join(f'{x:g}' for x in b)})")

    s = stack[:, valid].astype(np.float64)  # (M, N)
    above = s >= floor[:, None]
    at_floor = ~above[-1]
    use = np.ones_like(s, bool)
    if noise_floor == "exclude":
        use = above
        # a slope needs two distinct b-values above their own floors
        enough = use.sum(axis=0) >= 2
        too_few = np.zeros(lowest.shape, bool)
        too_few[valid] = ~enough
        reasons["too_few_b_above_noise_floor"] = too_few
        valid_idx = np.flatnonzero(valid.ravel())
        valid = valid.copy()
        valid.ravel()[valid_idx[~enough]] = False
        s, use, at_floor = s[:, enough], use[:, enough], at_floor[enough]
    else:
        reasons["too_few_b_above_noise_floor"] = np.zeros(lowest.shape, bool)
    y = np.log(s)
    w = (s ** 2 if method == "wlls" else np.ones_like(s)) * use
    sw = w.sum(axis=0)
    bm = (w * b[:, None]).sum(axis=0) / sw
    ym = (w * y).sum(axis=0) / sw
    db = b[:, None] - bm
    sxx = (w * db ** 2).sum(axis=0)
    slope = (w * db * (y - ym)).sum(axis=0) / sxx
    raw = -slope * 1e6
    adc = np.clip(raw, -1000.0, 5000.0)
    out = np.full(lowest.shape, np.nan, np.float32)
    out[valid] = adc
    _report(progress, 1.0, "ADC done")
    counts, seen = {}, np.zeros(lowest.shape, bool)
    for name in ADC_NAN_REASONS:  # each NaN voxel counted once, under its first reason
        r = reasons[name] & ~seen
        counts[name] = int(r.sum())
        seen |= r
    meta = {"units": ADC_UNITS, "quantity": "ADC", "method": method, "b_values": [float(x) for x in b],
            "noise_floor": noise_floor, "min_snr": float(min_snr),
            "noise_sigma": {f"{bv:g}": float(sg) for bv, sg in zip(b, sigma)},
            "voxels_total": int(lowest.size), "voxels_in_mask": int(body.sum()), "voxels_fitted": int(valid.sum()),
            "voxels_nan": int((~valid).sum()), "voxels_nan_in_mask": int((body & ~valid).sum()),
            "nan_reasons": counts, "voxels_clipped": int(np.sum(raw != adc)),
            "voxels_highest_b_at_noise_floor": int(at_floor.sum())} | _frame_meta(ref)
    logger.info("ADC (%s) from b=%s: %d voxels fitted (%d in the signal mask), NaN by reason %s, noise sigma %s",
                method, meta["b_values"], meta["voxels_fitted"], meta["voxels_in_mask"], counts, meta["noise_sigma"])
    return RasVolume(out, ref.ijk_to_ras.copy(), "ADC", meta)


def adc_qc(adc: RasVolume) -> dict:
    """Quality record of an ADC map (what adc_qc.json holds): fit, per-b noise sigma, NaN counts per reason.

    For a computed map (meta from :func:`compute_adc`) every key is reported; for an imported map only its
    NaN count is known (``"source": "imported"``).
    """
    m = dict(adc.meta or {})
    arr = np.asarray(adc.array)
    if "nan_reasons" not in m:
        return {"source": "imported", "voxels_total": int(arr.size), "voxels_nan": int(np.isnan(arr).sum()),
                "units": m.get("units", ADC_UNITS)}
    keys = ("method", "b_values", "noise_floor", "min_snr", "noise_sigma", "voxels_total", "voxels_in_mask",
            "voxels_fitted", "voxels_nan", "voxels_nan_in_mask", "nan_reasons", "voxels_clipped",
            "voxels_highest_b_at_noise_floor", "units")
    out = {"source": "computed"} | {k: m[k] for k in keys if k in m}
    inmask = max(int(m.get("voxels_in_mask", 0)), 1)
    out["nan_percent_of_signal_voxels"] = round(100.0 * m.get("voxels_nan_in_mask", 0) / inmask, 3)
    out["nan_reason_meaning"] = {
        "no_signal": "outside the signal mask of the lowest-b image (air, background)",
        "non_finite_input": "a DWI value is NaN or infinite",
        "non_positive_signal": "a DWI value is 0, so its logarithm is undefined",
        "too_few_b_above_noise_floor": "fewer than two b-values above their own noise floor (noise_floor='exclude')"}
    return out


def write_ef_qc(ef: RasVolume, path) -> str:
    """Write how an EF map was made (definition, tissue mask, DCE frames used and why) as JSON; returns the path."""
    import os

    m = dict(ef.meta or {})
    keys = ("definition", "tissue_mask", "voxels_computed", "voxels_in_tissue", "dynamic", "dynamic_sentence",
            "noise_sigma", "resampled_onto", FRAME_KEY)
    doc = {"source": "computed" if "definition" in m else "imported"} | {k: m[k] for k in keys if k in m}
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(jsonio.dumps(doc, with_reasons=True, indent=1))
    return os.fspath(path)


def write_adc_qc(adc: RasVolume, path) -> str:
    """Write :func:`adc_qc` of ``adc`` as JSON to ``path``; returns the path."""
    import os

    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(jsonio.dumps(adc_qc(adc), with_reasons=True, indent=1))
    return os.fspath(path)


def check_adc_units(adc: RasVolume, mask: np.ndarray | None = None, allow_convert: bool = False) -> RasVolume:
    """Check that an imported ADC map is in 10^-6 mm^2/s; detect mm^2/s and 10^-3 mm^2/s.

    The median of the positive finite values (inside ``mask`` if given) decides: < 0.01 means mm^2/s,
    < 10 means 10^-3 mm^2/s (tissue ADC is 0.1-4 in those units), otherwise 10^-6 mm^2/s. A wrong unit
    raises :class:`InputDataError`, or is converted with a warning when ``allow_convert`` is true.
    """
    arr = np.asarray(adc.array, float)
    sel = np.isfinite(arr) & (arr > 0)
    if mask is not None:
        sel &= np.asarray(mask, bool)
    if not sel.any():
        raise InputDataError(f"the ADC map '{adc.name}' has no positive values; it is empty or not an ADC map")
    med = float(np.median(arr[sel]))
    if med < 0.01:
        factor, unit = 1e6, "mm^2/s"
    elif med < 10:
        factor, unit = 1e3, "10^-3 mm^2/s"
    elif med > 10000:
        raise InputDataError(f"the ADC map '{adc.name}' has a median of {med:.0f}, far above tissue values in "
                             "10^-6 mm^2/s (100-4000); check the map's rescale slope and units")
    else:
        return adc.with_array(np.asarray(adc.array, np.float32), name=adc.name, units=ADC_UNITS, quantity="ADC")
    if not allow_convert:
        raise InputDataError(f"the ADC map '{adc.name}' looks like it is in {unit} (median {med:.4g}); "
                             "SmartBiopsy expects 10^-6 mm^2/s, so convert it or allow automatic conversion")
    logger.warning("ADC map '%s' looks like %s (median %.4g); converted to 1e-6 mm^2/s (x%g)", adc.name, unit, med, factor)
    return adc.with_array((arr * factor).astype(np.float32), name=adc.name, units=ADC_UNITS, quantity="ADC",
                          converted_from=unit)


def check_percent_map(vol: RasVolume, quantity: str, mask: np.ndarray | None = None,
                      allow_convert: bool = False) -> RasVolume:
    """Check that an imported FF/EF map is in percent, not a fraction (0-1); convert when allowed."""
    arr = np.asarray(vol.array, float)
    sel = np.isfinite(arr)
    if mask is not None:
        sel &= np.asarray(mask, bool)
    if not sel.any():
        raise InputDataError(f"the {quantity} map '{vol.name}' has no finite values inside the region of interest")
    hi = float(np.percentile(np.abs(arr[sel]), 99))
    if 0 < hi <= 1.5 and quantity == "FF":
        if not allow_convert:
            raise InputDataError(f"the FF map '{vol.name}' looks like a fraction (0-1); SmartBiopsy expects percent, "
                                 "so convert it or allow automatic conversion")
        logger.warning("FF map '%s' looks like a fraction; multiplied by 100", vol.name)
        arr = arr * 100.0
    return vol.with_array(arr.astype(np.float32), name=vol.name, units=PERCENT, quantity=quantity)


# -------------------------------------------------------------------------------------------------
# FF
# -------------------------------------------------------------------------------------------------
def _shell(body: np.ndarray, spacing_ijk: np.ndarray, depth_mm: float) -> np.ndarray:
    """Voxels of ``body`` within ``depth_mm`` of its outer surface (per-axis mm distances)."""
    filled = np.stack([ndimage.binary_fill_holes(s) for s in body])
    dist = ndimage.distance_transform_edt(np.pad(filled, 1), sampling=np.asarray(spacing_ijk, float)[::-1])[1:-1, 1:-1, 1:-1]
    return filled & (dist <= depth_mm)


def compute_ff(water: RasVolume, fat: RasVolume, mask: np.ndarray | None = None, on_swap: str = "correct",
               shell_mm: float = 10.0, transforms: Mapping[str, np.ndarray] | None = None,
               noise_correction: bool = False) -> RasVolume:
    """Fat fraction (percent) ``100 F / (W + F)`` from magnitude Dixon water and fat images.

    Noise floor: magnitude noise adds a positive bias to a small fat signal (FF of lean tissue would read
    ~0.5 points too high at SNR ~2). With ``noise_correction`` (off by default: at low SNR the floored
    estimate is no closer to the truth in the phantom) each image's noise sigma is estimated from its own
    background and the squared magnitudes are debiased (``A^2 = M^2 - 2 sigma^2``, floored at 0) first.

    Low signal: voxels outside ``mask`` or :func:`signal_mask` of W + F are NaN. Global swap: see the
    module docstring; ``on_swap`` is ``"correct"`` (default, exchange with a warning), ``"raise"`` or
    ``"ignore"``. ``meta`` reports ``swap_detected``, ``swap_corrected`` and the shell median FF.
    """
    if on_swap not in ("correct", "raise", "ignore"):
        raise ValueError(f"on_swap must be 'correct', 'raise' or 'ignore', not {on_swap!r}")
    vols = align_to_reference({"dixon_water": water, "dixon_fat": fat}, water, transforms)
    w = np.asarray(vols["dixon_water"].array, np.float64)
    f = np.asarray(vols["dixon_fat"].array, np.float64)
    finite = np.isfinite(w) & np.isfinite(f)
    if np.any(w[finite] < 0) or np.any(f[finite] < 0):
        raise InputDataError("the Dixon images contain negative values; magnitude water and fat images are required")
    total = np.where(finite, w + f, 0.0)
    if not np.any(total > 0):
        raise InputDataError("the Dixon water and fat images are empty (all zero); the series are corrupt or missing")
    body = signal_mask(total) if mask is None else np.asarray(mask, bool)
    valid = body & finite & (total > 0)
    sig_w = sig_f = 0.0
    if noise_correction:
        bg = ~signal_mask(total) & finite
        sig_w, sig_f = estimate_noise_sigma(w, bg & (w > 0)), estimate_noise_sigma(f, bg & (f > 0))
        w = np.sqrt(np.maximum(w ** 2 - 2.0 * sig_w ** 2, 0.0))
        f = np.sqrt(np.maximum(f ** 2 - 2.0 * sig_f ** 2, 0.0))
        total = np.where(finite, w + f, 0.0)
        valid &= total > 0
    ff = np.full(w.shape, np.nan, np.float32)
    ff[valid] = (100.0 * f[valid] / total[valid]).astype(np.float32)
    shell = _shell(signal_mask(total), water.spacing, shell_mm) & valid
    shell_med = float(np.median(ff[shell])) if shell.sum() > 100 else float("nan")
    swapped = bool(np.isfinite(shell_med) and shell_med < 50.0)
    meta = {"units": PERCENT, "quantity": "FF", "shell_median_ff": shell_med, "swap_detected": swapped,
            "swap_corrected": False, "voxels_computed": int(valid.sum()),
            "noise_sigma_water": float(sig_w), "noise_sigma_fat": float(sig_f)} | _frame_meta(water)
    if swapped:
        msg = (f"the Dixon water and fat images look swapped (median FF {shell_med:.0f}% in the outer {shell_mm:g} mm "
               "of the body, where subcutaneous fat should be above 50%)")
        if on_swap == "raise":
            raise InputDataError(msg + "; check the series labels or allow automatic swap correction")
        if on_swap == "correct":
            ff[valid] = 100.0 - ff[valid]
            meta["swap_corrected"] = True
            logger.warning("%s; water and fat were exchanged", msg)
        else:
            logger.warning("%s; kept as given", msg)
    return RasVolume(ff, water.ijk_to_ras.copy(), "FF", meta)


# -------------------------------------------------------------------------------------------------
# EF
# -------------------------------------------------------------------------------------------------
def compute_ef(pre: RasVolume, post: RasVolume, mask: np.ndarray | None = None,
               transforms: Mapping[str, np.ndarray] | None = None) -> RasVolume:
    """Enhancement fraction (percent) ``100 (post - pre) / pre`` from pre/post-contrast T1 of one sequence.

    Tissue: ``mask`` or :func:`tissue_mask` (signal before OR after contrast): a pre-contrast mask alone
    would drop the dark tissue that enhances, which is what the map is for. Voxels outside the tissue or
    with pre = 0 (ratio undefined) are NaN. ``transforms["t1_post"]``
    resamples a post-contrast series on another grid.
    """
    vols = align_to_reference({"t1_pre": pre, "t1_post": post}, pre, transforms)
    a = np.asarray(vols["t1_pre"].array, np.float64)
    p = np.asarray(vols["t1_post"].array, np.float64)
    finite = np.isfinite(a) & np.isfinite(p)
    if np.any(a[finite] < 0) or np.any(p[finite] < 0):
        raise InputDataError("the T1 images contain negative values; magnitude pre- and post-contrast images are required")
    if not np.any(a[finite] > 0):
        raise InputDataError("the pre-contrast T1 image is empty (all zero); the series is corrupt or missing")
    body = tissue_mask(np.where(finite, a, 0), np.where(finite, np.maximum(a, p), 0)) if mask is None \
        else np.asarray(mask, bool)
    return _ef_map(a, p, body & finite, pre, {"tissue_mask": "signal before or after contrast" if mask is None
                                              else "given"}
                   | _frame_meta(pre))


def tissue_mask(pre: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Voxels with signal before contrast OR at peak enhancement (:func:`signal_mask` of each, united).

    The peak (post-contrast or maximum-over-time) image keeps the dark tissue that only shows once it
    enhances; the pre-contrast image keeps tissue that an Otsu split of the peak image's several bright
    levels could leave out when the background is zero.
    """
    return signal_mask(pre) | signal_mask(peak)


def _ef_map(pre: np.ndarray, post: np.ndarray, tissue: np.ndarray, grid: RasVolume, extra: dict) -> RasVolume:
    valid = tissue & (pre > 0)
    ef = np.full(pre.shape, np.nan, np.float32)
    ef[valid] = (100.0 * (post[valid] - pre[valid]) / pre[valid]).astype(np.float32)
    med_body = float(np.median(ef[valid])) if valid.any() else float("nan")
    if np.isfinite(med_body) and med_body < -30:
        logger.warning("median enhancement in the body is %.0f%%; pre- and post-contrast may be swapped", med_body)
    meta = {"units": PERCENT, "quantity": "EF", "definition": "100*(post-pre)/pre",
            "voxels_computed": int(valid.sum()), "voxels_in_tissue": int(tissue.sum())} | extra
    return RasVolume(ef, grid.ijk_to_ras.copy(), "EF", meta)


@dataclass
class DynamicChoice:
    """Which frames of a DCE made the EF map: baseline (before bolus arrival) and post-contrast frame."""

    baseline_frames: list
    baseline_times_s: list
    bolus_arrival_frame: int | None
    bolus_arrival_s: float | None
    post_frame: int
    post_time_s: float
    post_choice: str                 # "peak" or "chosen"
    baseline_choice: str             # "automatic" or "chosen"
    curve: list                      # mean rise (frame - first frame) of the enhancing voxels, per frame

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def sentence(self) -> str:
        base = (f"baseline frames {self.baseline_frames[0] + 1}-{self.baseline_frames[-1] + 1} "
                f"({self.baseline_times_s[0]:.0f}-{self.baseline_times_s[-1]:.0f} s, {self.baseline_choice})")
        arrival = (f", bolus arrival {self.bolus_arrival_s:.0f} s" if self.bolus_arrival_s is not None else "")
        return (f"{base}{arrival}; post-contrast frame {self.post_frame + 1} at {self.post_time_s:.0f} s "
                f"({'peak enhancement' if self.post_choice == 'peak' else 'chosen time'})")


def choose_dynamic_frames(frames, times_s, tissue: np.ndarray, noise_sigma: float = 0.0,
                          baseline_frames: int | None = None, post_time_s: float | None = None,
                          min_rise: float = 0.10, min_fraction: float = 0.005) -> DynamicChoice:
    """Baseline frames before the bolus arrives, and the post-contrast frame (peak or chosen time).

    A tissue voxel enhances in frame t when (frame t - first frame) exceeds ``max(5 sqrt(2) sigma,
    min_rise x median tissue signal)``. The bolus arrives at the first frame in which at least
    ``min_fraction`` of the tissue (and 10 voxels) enhances; every frame before it is baseline
    (``baseline_frames`` = N takes the first N instead). The curve is the mean rise over the voxels that
    enhance in any frame; the post frame is its maximum after the baseline, or the frame nearest
    ``post_time_s`` (seconds from the first frame). Raises :class:`InputDataError` when nothing enhances.
    """
    t = np.asarray(times_s, float)
    n = len(frames)
    first = np.asarray(frames[0].array, np.float32)[tissue]
    threshold = max(5.0 * np.sqrt(2.0) * float(noise_sigma), min_rise * float(np.median(first)))
    def rise(k):  # recomputed per pass instead of holding every frame's rise (70 frames x 1e6 voxels)
        return np.asarray(frames[k].array, np.float32)[tissue] - first

    enhancing = np.zeros(first.shape, bool)
    fraction = np.zeros(n)
    for k in range(n):
        above = rise(k) > threshold
        fraction[k] = float(above.mean())
        enhancing |= above
    curve = np.array([float(rise(k)[enhancing].mean()) if enhancing.any() else 0.0 for k in range(n)])
    need = max(min_fraction, 10.0 / max(first.size, 1))
    if baseline_frames is not None:
        if not 1 <= int(baseline_frames) < n:
            raise InputDataError(f"the DCE has {n} frames, so the baseline must be 1 to {n - 1} frames, "
                                 f"not {baseline_frames}")
        nb, arrival, how = int(baseline_frames), None, "chosen"
    else:
        rising = np.flatnonzero(fraction[1:] >= need)
        if rising.size == 0:
            raise InputDataError(
                f"no contrast enhancement was found in the {n} DCE frames (no frame rises by more than "
                f"{threshold:.0f} in {100 * need:.1f} % of the tissue); check that contrast was given or choose "
                "the baseline frames and post time")
        arrival = int(rising[0] + 1)
        nb, how = arrival, "automatic"
    if post_time_s is not None:
        post = int(np.argmin(np.abs(t - float(post_time_s))))
        if post < nb:
            raise InputDataError(f"the chosen post-contrast time {post_time_s:g} s falls in the baseline "
                                 f"(first {nb} frames, up to {t[nb - 1]:.0f} s); choose a later time")
        pchoice = "chosen"
    else:
        post = int(nb + np.argmax(curve[nb:]))
        pchoice = "peak"
    return DynamicChoice(list(range(nb)), [float(x) for x in t[:nb]], arrival,
                         None if arrival is None else float(t[arrival]), post, float(t[post]), pchoice, how,
                         [round(float(c), 3) for c in curve])


def compute_ef_dynamic(frames, times_s, mask: np.ndarray | None = None, baseline_frames: int | None = None,
                       post_time_s: float | None = None) -> RasVolume:
    """Enhancement fraction (percent) from a DCE time series: ``100 (post - baseline) / baseline``.

    ``frames``: RasVolumes on one grid (magnitude, one sequence); ``times_s``: seconds from the first frame.
    Baseline = mean of the frames before bolus arrival (found automatically, or the first
    ``baseline_frames``); post = the peak-enhancement frame or the frame nearest ``post_time_s``. Tissue:
    ``mask`` or :func:`tissue_mask` of the first frame and the maximum over time. ``meta["dynamic"]`` states the frames used
    (:class:`DynamicChoice`), ``meta["dynamic_sentence"]`` says it in words.
    """
    if len(frames) < 2 or len(frames) != len(times_s):
        raise InputDataError("a DCE needs at least two frames, each with its acquisition time")
    ref = frames[0]
    for f in frames[1:]:
        if not f.same_grid(ref, tol=1e-3):
            raise InputDataError(f"DCE frame '{f.name}' is not on the grid of the first frame; the frames of one "
                                 "time series must share a grid")
    peak = np.zeros(ref.array.shape, np.float32)
    for f in frames:
        a = np.asarray(f.array, np.float32)
        if np.any(a[np.isfinite(a)] < 0):
            raise InputDataError("the DCE frames contain negative values; magnitude images are required")
        np.fmax(peak, a, out=peak)
    first = np.asarray(ref.array, np.float32)
    tissue = tissue_mask(np.where(np.isfinite(first), first, 0), peak) if mask is None else np.asarray(mask, bool)
    if not tissue.any():
        raise InputDataError("the DCE frames hold no tissue signal (all background); the series is empty or corrupt")
    sigma = estimate_noise_sigma(np.asarray(ref.array, float), ~signal_mask(peak))
    choice = choose_dynamic_frames(frames, times_s, tissue, sigma, baseline_frames, post_time_s)
    pre = np.mean([np.asarray(frames[i].array, np.float64) for i in choice.baseline_frames], axis=0)
    post = np.asarray(frames[choice.post_frame].array, np.float64)
    finite = np.isfinite(pre) & np.isfinite(post)
    out = _ef_map(pre, post, tissue & finite, ref,
                  {"definition": "100*(post-mean(baseline))/mean(baseline)",
                   "tissue_mask": "signal in the first frame or the maximum over time",
                   "dynamic": choice.to_dict(), "dynamic_sentence": choice.sentence(), "noise_sigma": float(sigma)}
                  | _frame_meta(ref))
    logger.info("EF from DCE: %s", choice.sentence())
    return out

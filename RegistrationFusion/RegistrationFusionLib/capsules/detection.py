"""Skin-capsule (fiducial marker) detection in CT and MRI with sub-voxel centroids.

Vitamin-oil capsules (about 10 x 5 mm, fat-like on CT, bright on T1/T2 MRI) are taped on the skin. They
are found as *bumps on the body surface*: everything that belongs to the patient (tissue above an
air/tissue threshold, holes filled slice by slice) is opened morphologically with a ball that is larger
than a capsule is thick (default radius 6 mm). The ball fits inside the body, inside a skin fold and inside
the table plate's neighbourhood, but not inside a capsule, so the difference "patient minus opened
patient" (the top-hat) holds the capsules and a few other small protrusions. Its connected components are
the candidates; each is measured by its principal axes in mm and rejected with a reason when it does not
look like a capsule (too small, too large, elongated like a tube, flat like the edge of a skin fold, dense
like the table, touching the image edge, ...).

Localisation: around each accepted candidate the grey-level top-hat ``I - opening(I)`` is the capsule's
own signal above the local background (air and the body's partial-volume edge removed by the opening, so
no intensity calibration, bias-field correction or threshold enters the centroid). Its intensity-weighted
centroid in a mask slightly larger than the capsule is the sub-voxel centre; partial volume at the
capsule's border is weighted in proportion, which also works across thick MRI slices.

Expected localisation error (FLE) per marker and axis combines the propagated image noise
(centroid variance of independent voxel noise) and a sampling term proportional to the voxel size (or
slice spacing); see :func:`_fle_per_axis`. It is reported as per-axis SDs along R, A, S and as full RAS
covariances for :mod:`RegistrationFusionLib.registration.landmarks`.

Frames and units: every point is RAS in mm (Slicer world); sizes in mm, volumes in mm^3.
Core module: numpy/scipy/SimpleITK only.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from scipy import ndimage

from RegistrationFusionLib.errors import RegistrationFusionError
from SmartBiopsyCoreLib.geometry import RasVolume

logger = logging.getLogger(__name__)

MODALITY_NAMES = {"ct": "CT", "mr": "MRI"}


class CapsuleDetectionError(RegistrationFusionError):
    """No usable capsule was found, or the image cannot be searched (message says what to do).

    ``rejected``: the candidates that were looked at and why they were not taken (may be empty).
    """

    def __init__(self, message: str, rejected: list | None = None):
        super().__init__(message)
        self.rejected = list(rejected or [])


class NoCapsulesFound(CapsuleDetectionError):
    """The image was searched and holds no capsule (the capsule-free fusion may take over)."""


@dataclass
class CapsuleParams:
    """Tunable settings of :func:`detect_capsules` (mm, mm^3, HU)."""

    nominal_length_mm: float = 10.0       #: capsule length (long axis)
    nominal_width_mm: float = 5.0         #: capsule diameter
    opening_radius_mm: float = 6.0        #: disc/ball that fits in the body but not in a capsule (centroid)
    detect_radius_mm: float | None = None  #: ball for finding candidates; None: 6 mm CT, 9 mm MRI (thick
    #: slices blur the capsule into the skin, a larger ball keeps it out of the opened body)
    min_length_mm: float = 6.0
    max_length_mm: float = 16.0
    min_width_mm: float = 2.5
    max_width_mm: float = 8.5
    max_elongation: float = 3.5           #: length / width above this: a tube or a wire
    min_flatness: float = 0.7             #: smallest / middle axis below this: flat, not a round capsule
    #: (a bump of the body outline or the edge of a skin fold is a cap, wider than thick; a capsule's
    #: cross-section is a circle: phantom capsules 0.86-0.99, false capsules on real scans 0.45-0.67)
    min_volume_mm3: float = 35.0          #: binary top-hat volume
    max_volume_mm3: float = 700.0
    max_contact_fraction: float = 0.55    #: share of the candidate lying against a protruding body part
    ct_air_threshold_hu: float = -500.0   #: air / tissue boundary
    ct_capsule_hu: tuple = (-300.0, 30.0)  #: accepted median HU of the capsule core
    ct_dense_hu: float = 100.0            #: core median above this: table, bone, metal
    mr_min_cnr: float = 5.0               #: top-hat peak / noise SD needed in MRI
    window_margin_mm: float = 1.5         #: centroid mask margin beyond the capsule (in-plane)
    noise_threshold_sd: float = 2.5       #: top-hat signal below this many noise SDs carries no weight
    fle_inplane_factor: float = 0.05      #: sampling/partial-volume FLE, fraction of the in-plane pixel size
    fle_slice_factor: float = 0.02        #: the same through-plane, fraction of the slice spacing
    fle_floor_mm: float = 0.05            #: smallest per-axis FLE reported
    min_confidence: float = 0.4           #: candidates below are rejected as "unlike a capsule"
    detection_grid_mm: float = 1.0        #: finer images are block-averaged to about this pixel size first
    #: (cost and memory then do not grow with finer pixels; the signal-weighted centroid stays sub-voxel)

    @classmethod
    def from_any(cls, params) -> "CapsuleParams":
        if params is None:
            return cls()
        if isinstance(params, cls):
            return params
        if isinstance(params, dict):
            unknown = set(params) - set(cls.__dataclass_fields__)
            if unknown:
                raise CapsuleDetectionError(
                    f"unknown capsule-detection setting(s) {sorted(unknown)}; valid ones are "
                    f"{sorted(cls.__dataclass_fields__)}")
            return cls(**params)
        raise CapsuleDetectionError("capsule-detection settings must be a CapsuleParams or a dict")


@dataclass
class RejectedCandidate:
    """A surface protrusion that was not accepted as a capsule, and why."""

    centre_ras: list
    reason: str
    size_mm: list
    volume_mm3: float
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"centre_ras": [round(float(v), 2) for v in self.centre_ras], "reason": self.reason,
                "size_mm": [round(float(v), 2) for v in self.size_mm], "volume_mm3": round(float(self.volume_mm3), 1),
                "metrics": {k: round(float(v), 3) for k, v in self.metrics.items()}}


@dataclass
class CapsuleDetection:
    """Capsules found in one image.

    ``centres_ras`` (N, 3) mm; ``confidence`` (N,) in [0, 1]; ``fle_mm`` (N, 3) expected localisation SD
    along R, A, S (mm); ``fle_cov_ras`` (N, 3, 3) the same as full covariances (mm^2);
    ``sizes_mm`` (N, 3) length, width, thickness (principal axes, mm); ``axes_ras`` (N, 3) unit long axes;
    ``rejected``: candidates that are not capsules with the reason.
    """

    modality: str
    image_name: str
    centres_ras: np.ndarray
    confidence: np.ndarray
    fle_mm: np.ndarray
    sizes_mm: np.ndarray
    fle_cov_ras: np.ndarray = None
    axes_ras: np.ndarray = None
    rejected: list = field(default_factory=list)
    noise_sd: float = 0.0
    labels: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.centres_ras)

    def to_dict(self) -> dict:
        return {
            "modality": self.modality,
            "image": self.image_name,
            "count": len(self),
            "capsules": [
                {"label": self.labels[i] if i < len(self.labels) else f"C{i + 1}",
                 "centre_ras": [round(float(v), 3) for v in self.centres_ras[i]],
                 "confidence": round(float(self.confidence[i]), 3),
                 "fle_mm": [round(float(v), 3) for v in self.fle_mm[i]],
                 "size_mm": [round(float(v), 2) for v in self.sizes_mm[i]]}
                for i in range(len(self))],
            "rejected": [r.to_dict() for r in self.rejected],
            "noise_sd": round(float(self.noise_sd), 3),
            "units": {"coordinates": "RAS mm", "fle": "mm (SD per axis R, A, S)", "size": "mm"},
        }


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _ball(radius_mm: float, spacing_ijk) -> np.ndarray:
    """Boolean (k, j, i) ellipsoidal footprint of a ball of ``radius_mm`` on the voxel grid."""
    s = np.asarray(spacing_ijk, float)
    r = np.floor(radius_mm / s + 1e-9).astype(int)  # (ri, rj, rk)
    k, j, i = np.mgrid[-r[2]:r[2] + 1, -r[1]:r[1] + 1, -r[0]:r[0] + 1]
    return (i * s[0]) ** 2 + (j * s[1]) ** 2 + (k * s[2]) ** 2 <= radius_mm ** 2 + 1e-9


def _have_edt() -> bool:
    try:
        import edt  # noqa: F401
    except ImportError:
        return False
    return True


def _distance_to(obj: np.ndarray, spacing_kji) -> np.ndarray:
    """Euclidean distance (mm) of every voxel to the nearest voxel of ``obj`` (0 inside ``obj``).

    Voxels beyond the array are not ``obj``. Uses the multi-threaded ``edt`` package when it is installed
    (not bundled with desktop Slicer) and SimpleITK's Maurer map otherwise; both are exact (float32).
    """
    sp = tuple(float(v) for v in np.asarray(spacing_kji, float))
    try:
        import edt
    except ImportError:
        edt = None
    if edt is not None:
        threads = max(1, int(os.cpu_count() or 1)) if obj.size >= 1_000_000 else 1  # small: no thread start-up
        return edt.edt(np.logical_not(obj).view(np.uint8), anisotropy=sp, black_border=False, parallel=threads)
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(obj.astype(np.uint8))
    img.SetSpacing(sp[::-1])
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(d), 0.0)


def _binary_open_edt(mask: np.ndarray, radius_mm: float, spacing_kji) -> np.ndarray:
    """Binary opening by a ball (mm) through two Euclidean distance transforms (fast for big balls).

    Voxels beyond the array border count as inside (a body cut by the field of view is not eroded there).
    Big masks are cropped to the box of their voxels grown by more than the radius (exact: a voxel
    outside it is farther than the radius from every mask voxel, and the array border stays where it is).
    """
    if not mask.any():
        return mask.copy()
    if mask.all():
        return mask.copy()
    if mask.size < 2_000_000 and not _have_edt():
        inside = ndimage.distance_transform_edt(mask, sampling=spacing_kji)
        eroded = inside > radius_mm
        if not eroded.any():
            return np.zeros_like(mask)
        return ndimage.distance_transform_edt(~eroded, sampling=spacing_kji) <= radius_mm
    sp = np.asarray(spacing_kji, float)
    nz = [np.nonzero(mask.any(axis=ax))[0] for ax in ((1, 2), (0, 2), (0, 1))]
    grow = np.ceil(radius_mm / sp).astype(int) + 1
    box = tuple(slice(max(int(a[0]) - g, 0), min(int(a[-1]) + 1 + g, n)) for a, g, n in zip(nz, grow, mask.shape))
    sub = mask[box]
    eroded = _distance_to(~sub, sp) > radius_mm
    out = np.zeros_like(mask)
    if not eroded.any():
        return out
    out[box] = _distance_to(eroded, sp) <= radius_mm
    return out


def _block_mean(arr: np.ndarray, factors_kji) -> np.ndarray:
    """Mean (float32) over non-overlapping blocks (k, j, i factors); the trailing remainder is cropped.

    Summed by strided slices, one output slab at a time (integer images are summed exactly), so no
    float copy of the whole input is made.
    """
    f = [int(v) for v in factors_kji]
    if f == [1, 1, 1]:
        return arr
    n = [s // v for s, v in zip(arr.shape, f)]
    if arr.dtype == bool or (np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize <= 2):
        acc_dtype = np.int32  # exact: at most 2^16 values per block would be needed to overflow
    elif np.issubdtype(arr.dtype, np.integer):
        acc_dtype = np.int64
    else:
        acc_dtype = np.float32
    count = int(np.prod(f))
    out = np.empty(n, np.float32)
    step = max(1, 131_072 // max(1, n[1] * n[2]))  # output slices per slab (the sum stays in the cache)
    for k0 in range(0, n[0], step):
        k1 = min(n[0], k0 + step)
        acc = np.zeros((k1 - k0, n[1], n[2]), acc_dtype)
        for a in range(f[0]):
            for b in range(f[1]):
                for c in range(f[2]):
                    acc += arr[k0 * f[0] + a:k1 * f[0]:f[0], b:n[1] * f[1]:f[1], c:n[2] * f[2]:f[2]]
        out[k0:k1] = acc
        out[k0:k1] /= np.float32(count)
    return out


def on_detection_grid(volume: RasVolume, body_mask: np.ndarray | None, grid_mm: float):
    """(volume, body_mask) block-averaged so that no pixel is finer than about ``grid_mm`` (mm).

    Each axis is reduced by ``floor(grid_mm / spacing)`` (at least 1); voxel centres stay exact (the new
    ijk->RAS maps each block's centre), the trailing remainder of fewer than one block is dropped. The
    mean is taken slab by slab in float32, so the peak memory is the input plus one reduced copy. A body
    mask is reduced by majority. Images already coarse enough are returned unchanged.
    """
    arr = volume.array
    if arr.ndim != 3 or arr.size == 0 or not np.issubdtype(arr.dtype, np.number) \
            or np.issubdtype(arr.dtype, np.complexfloating) or not grid_mm or grid_mm <= 0:
        return volume, body_mask
    f = np.maximum(1, np.floor(float(grid_mm) / volume.spacing[::-1] + 1e-6)).astype(int)  # k, j, i
    if np.all(f == 1) or np.any(np.array(arr.shape) < f):
        return volume, body_mask
    n = np.array(arr.shape) // f
    out = np.empty(tuple(n), np.float32)
    inv = 1.0 / float(np.prod(f))
    for k in range(n[0]):
        slab = arr[k * f[0]:(k + 1) * f[0], :n[1] * f[1], :n[2] * f[2]]
        acc = np.zeros((n[1], n[2]), np.float32)
        for a in range(f[0]):
            for b in range(f[1]):
                for c in range(f[2]):
                    acc += slab[a, b::f[1], c::f[2]]
        out[k] = acc * inv
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f[::-1].astype(float))
    scale[:3, 3] = (f[::-1] - 1) / 2.0
    reduced = RasVolume(out, volume.ijk_to_ras @ scale, volume.name, dict(volume.meta))
    if body_mask is not None:
        bm = np.asarray(body_mask, bool)
        if bm.shape != arr.shape:
            raise CapsuleDetectionError(f"the body mask {bm.shape} is not on the grid of the image {arr.shape}; "
                                        "resample it first")
        body_mask = _block_mean(bm.astype(np.float32), f) >= 0.5
    logger.info("%s: capsule detection on a %s mm grid (blocks %s)", volume.name,
                np.round(reduced.spacing, 2).tolist(), f[::-1].tolist())
    return reduced, body_mask


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Holes filled in every (k) slice, as ``binary_fill_holes`` slice by slice, in one 3-D labelling.

    The background is labelled with 4-connectivity inside each slice only; the components that do not reach
    the slice's border are the holes.
    """
    if mask.ndim != 3 or mask.size == 0:
        return mask.copy()
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndimage.generate_binary_structure(2, 1)
    lab, n = ndimage.label(~mask, structure=st)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, bool)
    for face in (lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]):
        outside[face] = True
    outside[0] = True  # the mask itself
    return mask | ~outside[lab]


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    v = values[np.isfinite(values)]
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    h, edges = np.histogram(v, bins=bins, range=(lo, hi))
    c = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(h)
    w1 = w0[-1] - w0
    m0 = np.cumsum(h * c)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(c[int(np.argmax(between[:-1]))])


def _noise_sd(arr: np.ndarray, background: np.ndarray, modality: str) -> float:
    """Noise SD from background (air) voxels: robust SD for CT, Rician-floor estimate for MRI."""
    v = arr[background].astype(np.float64)
    if v.size < 50:
        return float("nan")
    if v.size > 200000:
        v = v[:: v.size // 200000]
    if modality == "ct":
        med = np.median(v)
        return float(1.4826 * np.median(np.abs(v - med)))
    # air in a magnitude image is Rayleigh distributed: E[I^2] = 2 sigma^2
    v = v[v < np.percentile(v, 99)]
    return float(np.sqrt(np.mean(v ** 2) / 2.0))


def _weighted_moments(w: np.ndarray, pts_mm: np.ndarray):
    sw = float(w.sum())
    c = (w[:, None] * pts_mm).sum(axis=0) / sw
    d = pts_mm - c
    cov = (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(axis=0) / sw
    return c, cov


def _extents_from_cov(cov: np.ndarray, box_var: np.ndarray):
    """Full extents (mm) along principal axes of a solid ellipsoid with the given second moments.

    ``box_var``: per-axis variance added by sampling (Sheppard's correction, Delta^2/12), subtracted.
    """
    c = cov - np.diag(box_var)
    lam, vec = np.linalg.eigh(c)
    lam = np.clip(lam[::-1], 1e-6, None)
    vec = vec[:, ::-1]
    return 2.0 * np.sqrt(5.0 * lam), vec


# ------------------------------------------------------------------------------------------------
# main entry point
# ------------------------------------------------------------------------------------------------
#: candidate-finding ball radii (mm) tried in turn when ``detect_radius_mm`` is not set. In thick-slice
#: MRI a capsule lying between two slices blurs into the skin and survives only some ball sizes; the union
#: over radii (new capsules must lie a capsule length away from those already found) recovers it.
DEFAULT_DETECT_RADII_MM = {"ct": (6.0,), "mr": (9.0, 7.0)}


def detect_capsules(volume: RasVolume, modality: str, *, body_mask: np.ndarray | None = None,
                    params: CapsuleParams | dict | None = None,
                    progress: Callable[[float, str], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None) -> CapsuleDetection:
    """Find skin capsules in a CT (``modality='ct'``, HU) or an anatomical MRI (``'mr'``, T1/T2/PD).

    Runs :func:`detect_capsules_once` for each candidate-finding radius (``DEFAULT_DETECT_RADII_MM`` unless
    ``params.detect_radius_mm`` is set) and merges the capsules found; see :func:`detect_capsules_once`.
    """
    p = CapsuleParams.from_any(params)
    mod = str(modality).lower()
    mod = "mr" if mod in ("mri", "mr", "t1", "t2") else mod
    volume, body_mask = on_detection_grid(volume, body_mask, p.detection_grid_mm)
    radii = (p.detect_radius_mm,) if p.detect_radius_mm is not None else DEFAULT_DETECT_RADII_MM.get(mod, (None,))
    merged, first_error = None, None
    for n, r in enumerate(radii):
        lo, hi = n / len(radii), (n + 1) / len(radii)
        sub = None if progress is None else (lambda f, m, lo=lo, hi=hi: progress(lo + (hi - lo) * f, m))
        try:
            det = detect_capsules_once(volume, modality, body_mask=body_mask,
                                       params=replace(p, detect_radius_mm=r), progress=sub,
                                       should_cancel=should_cancel)
        except CapsuleDetectionError as exc:
            if not str(exc).startswith("no skin capsules found") or "image is empty" in str(exc):
                raise
            first_error = first_error or exc
            continue
        merged = det if merged is None else _merge_detections(merged, det, p.nominal_length_mm)
    if merged is None:
        raise first_error
    return merged


def _merge_detections(a: CapsuleDetection, b: CapsuleDetection, min_sep_mm: float) -> CapsuleDetection:
    """Capsules of ``a`` plus those of ``b`` lying at least ``min_sep_mm`` from every capsule of ``a``."""
    d = np.linalg.norm(b.centres_ras[:, None, :] - a.centres_ras[None, :, :], axis=2)
    new = np.where(d.min(axis=1) >= min_sep_mm)[0]
    if new.size == 0:
        return a
    cat = lambda x, y: np.concatenate([x, y[new]])  # noqa: E731
    centres = cat(a.centres_ras, b.centres_ras)
    order = np.lexsort((-centres[:, 0], -centres[:, 2]))
    fields = {k: cat(getattr(a, k), getattr(b, k))[order]
              for k in ("confidence", "fle_mm", "sizes_mm", "fle_cov_ras", "axes_ras")}
    accepted = centres[order]
    rejected = a.rejected + b.rejected
    if rejected:
        rc = np.array([np.asarray(r.centre_ras, float) for r in rejected])
        far = np.linalg.norm(rc[:, None, :] - accepted[None, :, :], axis=2).min(axis=1) > min_sep_mm / 2
        seen, uniq = set(), []
        for r, c, keep in zip(rejected, rc, far):  # one entry per 2 mm cell: the same candidate seen twice
            key = tuple(np.floor(c / 2.0).astype(int))
            if keep and key not in seen:
                seen.add(key)
                uniq.append(r)
    else:
        uniq = []
    logger.info("%s: %d more capsule(s) found with another candidate radius", a.image_name, new.size)
    return CapsuleDetection(modality=a.modality, image_name=a.image_name, centres_ras=accepted,
                            rejected=uniq, noise_sd=a.noise_sd, labels=[f"C{i + 1}" for i in range(len(accepted))],
                            **fields)


def detect_capsules_once(volume: RasVolume, modality: str, *, body_mask: np.ndarray | None = None,
                         params: CapsuleParams | dict | None = None,
                         progress: Callable[[float, str], None] | None = None,
                         should_cancel: Callable[[], bool] | None = None) -> CapsuleDetection:
    """Find skin capsules in a CT (``modality='ct'``, HU) or an anatomical MRI (``'mr'``, T1/T2/PD).

    ``body_mask``: optional boolean (k, j, i) patient mask on the same grid (replaces the automatic
    threshold; capsules must be *included* in it, as they are in a threshold mask). ``params``:
    :class:`CapsuleParams` or a dict of its fields. Returns a :class:`CapsuleDetection` in RAS mm,
    capsules ordered from superior to inferior, then right to left, and labelled C1..CN.
    Raises :class:`CapsuleDetectionError` when the image is empty, not in the expected units, or holds
    no capsule.

    Steps: (1) on a grid of about 2 mm the patient mask (threshold, holes filled slice by slice) is
    opened with a ball of ``opening_radius_mm``; the components of the difference are the candidates.
    (2) Around each candidate, at full resolution, the same opening gives the candidate's voxels, the
    grey-level opening gives its signal above the surroundings, and the signal-weighted centroid, the
    principal sizes, the contrast and the FLE are measured; shape and intensity tests accept or reject.
    """
    p = CapsuleParams.from_any(params)
    volume, body_mask = on_detection_grid(volume, body_mask, p.detection_grid_mm)
    mod = str(modality).lower()
    if mod in ("mri", "mr", "t1", "t2"):
        mod = "mr"
    if mod not in MODALITY_NAMES:
        raise CapsuleDetectionError(f"unknown modality '{modality}'; use 'ct' or 'mr'")
    what = f"{MODALITY_NAMES[mod]} '{volume.name}'"

    def report(f, msg):
        if progress:
            progress(float(f), msg)
        if should_cancel and should_cancel():
            raise CapsuleDetectionError(f"capsule detection in the {what} was cancelled")

    arr = np.asarray(volume.array)
    if arr.size == 0 or min(arr.shape) < 1:
        raise CapsuleDetectionError(f"no skin capsules found in the {what}: the image is empty; load the full series")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise CapsuleDetectionError(f"the {what} does not hold real-valued intensities; load a scalar image")
    # integer images (HU, scanner values up to 16 bits) are read as they are: no float copy of the volume;
    # every window below is converted on its own. Other real types go through float32 as before.
    if not (np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize <= 2) and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    if arr.dtype == np.float32 and not np.all(np.isfinite(arr)):
        fin = np.isfinite(arr)
        arr = np.where(fin, arr, float(arr[fin].min()) if fin.any() else 0.0).astype(np.float32)
    spacing_ijk = volume.spacing
    spacing_kji = spacing_ijk[::-1].copy()
    direction = volume.direction_ras
    lo_v, hi_v = float(arr.min()), float(arr.max())
    if hi_v <= lo_v:
        raise CapsuleDetectionError(
            f"no skin capsules found in the {what}: the image is uniform (every voxel {lo_v:g}); "
            "check that the right series was loaded")
    if min(arr.shape) < 3 and max(spacing_kji) * min(arr.shape) < 2 * p.nominal_length_mm:
        raise CapsuleDetectionError(
            f"no skin capsules found in the {what}: it has only {min(arr.shape)} slice(s); load the whole series")
    report(0.02, "patient mask")

    # ---------------------------------------------------------------- (1) coarse candidates
    factors = np.maximum(1, np.floor(2.0 / spacing_kji + 0.5)).astype(int)
    coarse = _block_mean(arr, factors)
    cspacing = spacing_kji * factors
    if mod == "ct":
        if lo_v > -200.0:
            raise CapsuleDetectionError(
                f"no skin capsules found in the {what}: it has no values below -200 HU, so it is not in "
                "Hounsfield units (missing rescale slope/intercept) or is not a CT; load the CT with its rescale")
        threshold = p.ct_air_threshold_hu
    else:
        sample = coarse[:: max(1, coarse.shape[0] // 24)].ravel()
        otsu = _otsu(sample)
        air = sample[sample < 0.1 * otsu]
        air_floor = float(np.mean(air) + 6.0 * np.std(air)) if air.size > 100 else 0.0
        # low enough to keep dark tissue that reaches the skin (muscle on T2) inside the patient
        threshold = max(0.2 * otsu, air_floor)
    if body_mask is not None:
        bm = np.asarray(body_mask, bool)
        if bm.shape != arr.shape:
            raise CapsuleDetectionError(
                f"the body mask {bm.shape} is not on the grid of the {what} {arr.shape}; resample it first")
        fg_c = _block_mean(bm.astype(np.float32), factors) >= 0.5
    else:
        bm = None
        fg_c = coarse > threshold
    if not fg_c.any():
        raise CapsuleDetectionError(
            f"no skin capsules found in the {what}: no patient found (nothing above {threshold:g}); "
            "check the image and the modality")
    fg_c = _fill_holes_per_slice(fg_c)
    report(0.10, "opening the patient outline")
    r_detect = p.detect_radius_mm if p.detect_radius_mm is not None else (6.0 if mod == "ct" else 9.0)
    opened_c = _binary_open_edt(fg_c, r_detect, cspacing)
    report(0.40, "labelling candidates")
    tophat_c = fg_c & ~opened_c
    labels_c, n = ndimage.label(tophat_c, structure=ndimage.generate_binary_structure(3, 2))
    objects = ndimage.find_objects(labels_c)
    noise_global = _noise_sd(coarse, ~ndimage.binary_dilation(fg_c, iterations=2), mod) * float(np.sqrt(np.prod(factors)))

    voxel_mm3 = float(np.prod(spacing_ijk))
    ball = _ball(p.opening_radius_mm, spacing_ijk)
    margin_vox = np.ceil((2 * max(p.opening_radius_mm, r_detect) + p.window_margin_mm) / spacing_kji).astype(int)
    cross2d = np.zeros((3, 3, 3), bool)
    cross2d[1] = ndimage.generate_binary_structure(2, 1)
    grow2d = _ball(p.window_margin_mm, (spacing_ijk[0], spacing_ijk[1], 1.0))
    grow2d = grow2d[grow2d.shape[0] // 2]
    min_coarse_vox = 0.25 * p.min_volume_mm3 / float(np.prod(cspacing))
    if np.prod(factors) > 1:
        min_coarse_vox = max(min_coarse_vox, 2.0)  # a lone block of a reduced grid: a speck, never a capsule
    centres, confs, fles, covs, sizes, axes = [], [], [], [], [], []
    rejected: list[RejectedCandidate] = []
    taken = _TakenVoxels()  # full-resolution voxels already assigned to a candidate

    for lab in range(1, n + 1):
        if lab % 4 == 0:
            report(0.45 + 0.5 * lab / n, f"candidate {lab}/{n}")
        slc = objects[lab - 1]
        if slc is None:
            continue
        ccomp = labels_c[slc] == lab
        nvox_c = int(ccomp.sum())
        if nvox_c < min_coarse_vox:
            continue  # specks: not worth reporting
        c_lo = np.array([s.start for s in slc]) * factors
        c_hi = np.minimum(np.array([s.stop for s in slc]) * factors, arr.shape)
        cidx = np.argwhere(ccomp) + np.array([s.start for s in slc])
        c_ras = volume.kji_to_ras_points((cidx.mean(axis=0) * factors + (factors - 1) / 2.0)[None])[0]
        ext_mm = (c_hi - c_lo) * spacing_kji
        vol_c = nvox_c * float(np.prod(cspacing))
        metrics: dict = {}

        def reject(reason, size=None, centre=None, vol=None):
            rejected.append(RejectedCandidate(
                list(centre if centre is not None else c_ras), reason,
                list(size if size is not None else sorted(ext_mm, reverse=True)),
                float(vol if vol is not None else vol_c), dict(metrics)))

        ext_sorted = np.sort(ext_mm)[::-1]
        if ext_sorted[0] > 3.0 * p.max_length_mm:
            # long and thin (a line or tube lying on the skin) or long and wide (table plate, body edge)
            thin = ext_sorted[1] <= 2.0 * p.max_width_mm + 2.0 * float(cspacing.max())
            reject("elongated (tube?)" if thin else "too large (table or body edge)")
            continue
        if vol_c > 3.0 * p.max_volume_mm3:
            reject("too large")
            continue

        # ------------------------------------------------------------ (2) full-resolution window
        lo = np.maximum(c_lo - margin_vox, 0)
        hi = np.minimum(c_hi + margin_vox, arr.shape)
        win = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        img = arr[win].astype(np.float64)
        fg = bm[win] if bm is not None else img > threshold
        opened = _binary_open_edt(fg, r_detect, spacing_kji)
        th = ndimage.binary_opening(fg & ~opened, structure=cross2d)
        lab_w, nw = ndimage.label(th, structure=ndimage.generate_binary_structure(3, 2))
        if nw == 0:
            reject("too small")
            continue
        # the full-resolution component(s) overlapping the coarse candidate
        cmask = np.zeros(img.shape, bool)
        cm = np.repeat(np.repeat(np.repeat(ccomp, factors[0], 0), factors[1], 1), factors[2], 2)
        off = c_lo - lo
        cm = cm[: hi[0] - c_lo[0], : hi[1] - c_lo[1], : hi[2] - c_lo[2]]
        cmask[off[0]:off[0] + cm.shape[0], off[1]:off[1] + cm.shape[1], off[2]:off[2] + cm.shape[2]] = cm
        hit = np.unique(lab_w[ccomp_dilate(cmask) & (lab_w > 0)])
        if hit.size == 0:
            reject("too small")
            continue
        comp = np.isin(lab_w, hit) & ~taken.in_box(lo, hi)
        nvox = int(comp.sum())
        if nvox == 0:
            continue
        vol_mm3 = nvox * voxel_mm3
        idx = np.argwhere(comp)
        c_ras = volume.kji_to_ras_points((idx.mean(axis=0) + lo)[None])[0]
        bbox_lo, bbox_hi = idx.min(axis=0) + lo, idx.max(axis=0) + lo + 1
        ext_mm = (bbox_hi - bbox_lo) * spacing_kji
        vol_c = vol_mm3
        taken.add(lo, comp)
        if vol_mm3 < p.min_volume_mm3:
            reject("too small")
            continue
        if vol_mm3 > p.max_volume_mm3:
            reject("too large")
            continue
        if np.any(bbox_lo == 0) or np.any(bbox_hi == np.array(arr.shape)):
            reject("cut by the image edge")
            continue

        # outward skin normal at the candidate: from the opened body's centroid nearby to the candidate
        normal_kji = _outward_normal(opened, idx, spacing_kji, 2.0 * p.opening_radius_mm)
        smooth = ndimage.gaussian_filter(img, sigma=(0.0, 0.6, 0.6))
        if normal_kji is not None:
            # a flat disc in the skin's tangent plane follows the skin's partial-volume ramp exactly but
            # cannot enter the capsule or the blurred gap under it (a ball's cap would, biasing outwards)
            fp = _disc_footprint(p.opening_radius_mm, spacing_kji, normal_kji)
        else:
            fp = ball
        # centroid mask (below) first: the grey opening is only needed there
        # centroid mask: the component's footprint (projected through its slices) grown in-plane by the
        # margin, on the component's slices plus one on either side (thick-slice tails), without the
        # voxels well inside the opened body (their signal is noise only)
        foot = ndimage.binary_dilation(comp.any(axis=0), structure=grow2d)
        kk = np.nonzero(comp.any(axis=(1, 2)))[0]
        mask = np.zeros(img.shape, bool)
        mask[max(kk[0] - 1, 0):kk[-1] + 2] = foot
        mask &= ~ndimage.binary_erosion(opened, structure=np.ones((1, 3, 3), bool), border_value=1)
        signal = np.zeros(img.shape)
        need = mask | comp
        signal[need] = img[need] - _grey_opening_at(smooth, fp, need)
        local_bg = ~ndimage.binary_dilation(fg, iterations=2)
        noise = _noise_sd(img, local_bg, mod) if local_bg.sum() >= 200 else float("nan")
        if not np.isfinite(noise) or noise <= 0:
            noise = noise_global if np.isfinite(noise_global) and noise_global > 0 else 1e-3
        # soft threshold at a few noise SDs: the top-hat of pure noise is not centred on zero (opening)
        # and would pull the centroid towards the middle of the mask
        w = np.where(mask, np.clip(signal - p.noise_threshold_sd * noise, 0.0, None), 0.0)
        peak = float(np.percentile(signal[comp], 95))
        if peak <= 0 or w.sum() <= 0:
            reject("no signal above the surroundings")
            continue
        kji = np.argwhere(mask)
        wv = w[mask]
        pts_mm = (kji + lo) * spacing_kji  # grid mm along k, j, i
        cen_grid, cov_grid = _weighted_moments(wv, pts_mm)
        centre_ras = volume.kji_to_ras_points((cen_grid / spacing_kji)[None])[0]
        extents, vec_kji = _extents_from_cov(cov_grid, spacing_kji ** 2 / 12.0)
        long_axis_ras = direction @ vec_kji[::-1, 0]
        long_axis_ras /= np.linalg.norm(long_axis_ras)
        length, width, thick = (float(v) for v in extents)
        flat = thick / max(width, 1e-6)
        # contact with the opened body: the edge of a skin fold lies against it, a capsule only touches
        shell = ndimage.binary_dilation(comp, structure=ndimage.generate_binary_structure(3, 1)) & ~comp
        contact = float((shell & opened).sum()) / max(float(shell.sum()), 1.0)
        core = comp & (signal >= 0.5 * peak)
        core_med = float(np.median(img[core])) if core.any() else float("nan")
        cnr = peak / max(noise, 1e-6)
        size = [length, width, thick]
        metrics.update(contact=contact, flatness=flat, cnr=cnr, core_median=core_med)
        # sizes along thick slices are uncertain by about half a slice: widen the limits accordingly
        tol = 0.5 * float(max(spacing_kji))

        def rej(reason):
            reject(reason, size, centre_ras, vol_mm3)

        if mod == "ct" and core_med > p.ct_dense_hu:
            rej(f"table or dense object ({core_med:.0f} HU, capsules are fat-like)")
            continue
        if mod == "ct" and not (p.ct_capsule_hu[0] <= core_med <= p.ct_capsule_hu[1]):
            rej(f"not fat-like ({core_med:.0f} HU)")
            continue
        if mod == "mr" and cnr < p.mr_min_cnr:
            rej(f"too faint (contrast-to-noise {cnr:.1f})")
            continue
        if length > p.max_length_mm + tol and length / max(width, 1e-6) > p.max_elongation:
            rej("elongated (tube?)")
            continue
        if length > p.max_length_mm + tol or width > p.max_width_mm + tol:
            rej("too large")
            continue
        if length < p.min_length_mm - tol or width < p.min_width_mm:
            rej("too small")
            continue
        if length / max(width, 1e-6) > p.max_elongation:
            rej("elongated (tube?)")
            continue
        if flat < p.min_flatness:
            rej(f"flat (thickness/width {flat:.2f}): a bump of the body outline or a skin fold, not a round capsule")
            continue
        if contact > p.max_contact_fraction:
            rej("attached to body (skin fold)")
            continue

        # ------------------------------------------------------------ confidence and FLE
        conf = (math.exp(-0.5 * ((length - p.nominal_length_mm) / (0.3 * p.nominal_length_mm + tol)) ** 2)
                * math.exp(-0.5 * ((width - p.nominal_width_mm) / (0.3 * p.nominal_width_mm)) ** 2)
                * (1.0 - math.exp(-cnr / 5.0))
                * (1.0 - max(0.0, contact - 0.25)))
        metrics["confidence"] = conf
        if conf < p.min_confidence:
            rej(f"unlike a capsule (confidence {conf:.2f})")
            continue
        sd_kji = _fle_per_axis(noise, wv, pts_mm, cen_grid, spacing_kji, p)
        cov_ras = direction @ np.diag(sd_kji[::-1] ** 2) @ direction.T
        centres.append(centre_ras)
        confs.append(conf)
        covs.append(cov_ras)
        fles.append(np.sqrt(np.diag(cov_ras)))
        sizes.append(size)
        axes.append(long_axis_ras)

    report(0.97, "ordering capsules")
    if not centres:
        reasons = sorted({r.reason.split(" (")[0] for r in rejected})
        extra = f" ({len(rejected)} candidate(s) rejected: {', '.join(reasons)})" if rejected else ""
        raise NoCapsulesFound(
            f"no skin capsules found in the {what}{extra}; check that the capsules are inside the field of "
            f"view and that the image is a {'CT' if mod == 'ct' else 'T1/T2-weighted MRI'}", rejected)
    centres = np.array(centres)
    order = np.lexsort((-centres[:, 0], -centres[:, 2]))
    result = CapsuleDetection(
        modality=mod, image_name=volume.name, centres_ras=centres[order], confidence=np.array(confs)[order],
        fle_mm=np.array(fles)[order], sizes_mm=np.array(sizes)[order], fle_cov_ras=np.array(covs)[order],
        axes_ras=np.array(axes)[order], rejected=rejected, noise_sd=float(noise_global),
        labels=[f"C{i + 1}" for i in range(len(centres))])
    logger.info("%s: %d capsule(s) found, %d candidate(s) rejected", what, len(result), len(rejected))
    report(1.0, f"{len(result)} capsules")
    return result


def _grey_opening_at(image: np.ndarray, footprint: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``ndimage.grey_opening(image, footprint=footprint, mode="nearest")[where]``, computed near those voxels only.

    ``footprint``: boolean, odd-sized and point-symmetric (balls, discs). The erosion is evaluated only on the
    box the dilation of ``where`` reads (the box of ``where`` grown by the footprint's half size), the dilation
    only on the box of ``where``; each is a minimum/maximum over shifted slices of an edge-padded array, so the
    values are the same as the full filter's (minimum and maximum are exact) at a fraction of the cost.
    """
    shape = np.array(image.shape)
    h = np.array(footprint.shape) // 2
    offs = np.argwhere(footprint) - h  # (m, 3)
    nz = [np.nonzero(where.any(axis=ax))[0] for ax in ((1, 2), (0, 2), (0, 1))]
    if any(len(v) == 0 for v in nz):
        return np.zeros(0, image.dtype)
    lo = np.array([v[0] for v in nz])
    hi = np.array([v[-1] for v in nz])
    ylo, yhi = np.maximum(lo - h, 0), np.minimum(hi + h, shape - 1)
    # erosion on [ylo, yhi]: reads image[clip(y + g)] = padded[y + g + 2h] (edge padding = nearest mode)
    padded = np.pad(image, [(int(v), int(v)) for v in 2 * h], mode="edge")
    a0 = ylo + 2 * h
    a1 = yhi + 1 + 2 * h
    ero = None
    for f in offs:
        v = padded[a0[0] + f[0]:a1[0] + f[0], a0[1] + f[1]:a1[1] + f[1], a0[2] + f[2]:a1[2] + f[2]]
        ero = v.copy() if ero is None else np.minimum(ero, v, out=ero)
    # dilation on [lo, hi]: reads the erosion at clip(x - f); inside the box unless the box was clipped by the
    # image border, where the edge padding of the erosion is again the nearest mode
    ep = np.pad(ero, [(int(v), int(v)) for v in h], mode="edge")
    b0 = lo - ylo + h
    b1 = hi + 1 - ylo + h
    out = None
    for f in offs:
        v = ep[b0[0] - f[0]:b1[0] - f[0], b0[1] - f[1]:b1[1] - f[1], b0[2] - f[2]:b1[2] - f[2]]
        out = v.copy() if out is None else np.maximum(out, v, out=out)
    return out[where[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]]


class _TakenVoxels:
    """Full-resolution voxels already assigned to a candidate, kept as (corner, boolean box) pieces: no mask of
    the whole volume is allocated or touched."""

    def __init__(self):
        self._parts: list = []

    def add(self, lo, box: np.ndarray) -> None:
        self._parts.append((np.asarray(lo, int), box))

    def in_box(self, lo, hi) -> np.ndarray:
        lo, hi = np.asarray(lo, int), np.asarray(hi, int)
        out = np.zeros(tuple(hi - lo), bool)
        for plo, box in self._parts:
            a = np.maximum(lo, plo)
            b = np.minimum(hi, plo + np.array(box.shape))
            if np.any(b <= a):
                continue
            out[a[0] - lo[0]:b[0] - lo[0], a[1] - lo[1]:b[1] - lo[1], a[2] - lo[2]:b[2] - lo[2]] |= \
                box[a[0] - plo[0]:b[0] - plo[0], a[1] - plo[1]:b[1] - plo[1], a[2] - plo[2]:b[2] - plo[2]]
        return out


def ccomp_dilate(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(mask, iterations=1)


def _outward_normal(opened: np.ndarray, comp_idx: np.ndarray, spacing_kji: np.ndarray, radius_mm: float):
    """Unit outward skin normal (grid k, j, i axes, mm-scaled) at a candidate, or None if no body is near.

    The centroid of the opened body within ``radius_mm`` of the candidate's centre lies beneath it.
    """
    c = comp_idx.mean(axis=0)
    body = np.argwhere(opened)
    if body.size == 0:
        return None
    d = (body - c) * spacing_kji
    near = (d ** 2).sum(axis=1) <= radius_mm ** 2
    if near.sum() < 10:
        return None
    v = -d[near].mean(axis=0)
    nv = float(np.linalg.norm(v))
    return v / nv if nv > 1e-6 else None


def _disc_footprint(radius_mm: float, spacing_kji: np.ndarray, normal_kji: np.ndarray) -> np.ndarray:
    """Boolean (k, j, i) footprint of a flat, one-voxel-thick disc of ``radius_mm`` perpendicular to the normal."""
    s = np.asarray(spacing_kji, float)
    n = np.asarray(normal_kji, float) / np.linalg.norm(normal_kji)
    r = np.floor(radius_mm / s + 1e-9).astype(int)
    k, j, i = np.mgrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    d = np.stack([k * s[0], j * s[1], i * s[2]], axis=-1)
    along = d @ n
    tang2 = (d ** 2).sum(axis=-1) - along ** 2
    half = 0.5 * float(np.sum(np.abs(n) * s))  # half the voxel's extent along the normal (naive digital plane)
    return (np.abs(along) <= half + 1e-9) & (tang2 <= radius_mm ** 2 + 1e-9)


def _fle_per_axis(noise: float, weights: np.ndarray, pts_mm: np.ndarray, centre_mm: np.ndarray,
                  spacing_kji: np.ndarray, p: CapsuleParams) -> np.ndarray:
    """Expected localisation SD (mm) along the grid axes (k, j, i) of a signal-weighted centroid.

    Noise part: each voxel's independent noise (SD ``noise``) moves the centroid by
    ``noise * (x_v - c) / sum(w)``; summed in quadrature. Sampling part: partial volume and the finite
    voxel size leave an error that behaves like a fraction of the pixel size in-plane
    (``fle_inplane_factor``) and of the slice spacing through-plane (``fle_slice_factor``; smaller, as a
    capsule spans several slices). Both factors were calibrated on the digital phantom (CT 1 x 1 x 2 mm,
    MRI 1.5 x 1.5 x 6 mm). Floor ``fle_floor_mm``.
    """
    noise_var = noise ** 2 * ((pts_mm - centre_mm) ** 2).sum(axis=0) / float(weights.sum()) ** 2
    factors = np.array([p.fle_slice_factor, p.fle_inplane_factor, p.fle_inplane_factor])
    sd = np.sqrt(noise_var + (factors * np.asarray(spacing_kji, float)) ** 2)
    return np.maximum(sd, p.fle_floor_mm)

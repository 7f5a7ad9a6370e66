"""Simulate a confirmation CT with a biopsy needle in place (for the demo, tests and benchmarks).

The needle is drawn as a metal cylinder (outer diameter of the needle model) from a little outside the
planned skin entry to the *actual* tip: planned target plus an optional placement error split into a
depth part (along the planned direction) and a lateral part (perpendicular to it); the entry stays
where it was planned (the needle pivots at the skin). Partial volume comes from supersampling every
voxel, a Gaussian point-spread function blurs the metal like a scanner's reconstruction kernel, mild
streaks imitate beam hardening around the metal, and Gaussian noise is added where the image changed.

Frames: every point and direction is Slicer RAS in millimetres; the CT is a :class:`RasVolume` in HU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from SmartBiopsyCoreLib.geometry import RasVolume, perpendicular  # noqa: F401  (re-exported)
from SmartBiopsyCoreLib.phantom.confirmation import placed_tip

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyLib.sampling.needle import resolve_needle_geometry

logger = logging.getLogger(__name__)

#: Highest value a 12-bit CT stores (HU); metal saturates here.
CT_MAX_HU = 3071.0


@dataclass
class NeedleTruth:
    """Where the simulated needle really is (RAS mm)."""

    planned_entry_ras: np.ndarray
    planned_target_ras: np.ndarray
    entry_ras: np.ndarray
    tip_ras: np.ndarray
    axis: np.ndarray  #: unit vector from entry towards the tip
    lateral_error_mm: float
    depth_error_mm: float
    lateral_direction: np.ndarray  #: unit vector perpendicular to the planned direction
    outer_diameter_mm: float

    def to_dict(self) -> dict:
        return {
            "planned_entry_ras": [float(v) for v in self.planned_entry_ras],
            "planned_target_ras": [float(v) for v in self.planned_target_ras],
            "entry_ras": [float(v) for v in self.entry_ras],
            "tip_ras": [float(v) for v in self.tip_ras],
            "axis": [float(v) for v in self.axis],
            "lateral_error_mm": float(self.lateral_error_mm),
            "depth_error_mm": float(self.depth_error_mm),
            "lateral_direction": [float(v) for v in self.lateral_direction],
            "outer_diameter_mm": float(self.outer_diameter_mm),
        }


@dataclass
class SimulatedConfirmation:
    """A confirmation CT with the needle drawn in, and the truth about the needle."""

    ct: RasVolume
    truth: NeedleTruth


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n == 0:
        raise InputDataError("a direction of zero length was given; entry and target must be different points")
    return v / n


def _ijk_box(volume: RasVolume, points_ras: np.ndarray, margin_mm: float):
    """Index box (k0, k1, j0, j1, i0, i1) covering ``points_ras`` grown by ``margin_mm``, clipped to the volume."""
    lo = points_ras.min(axis=0) - margin_mm
    hi = points_ras.max(axis=0) + margin_mm
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = volume.ras_to_ijk_points(corners)
    i0, j0, k0 = np.floor(ijk.min(axis=0)).astype(int)
    i1, j1, k1 = np.ceil(ijk.max(axis=0)).astype(int) + 1
    nk, nj, ni = volume.array.shape
    return (max(k0, 0), min(k1, nk), max(j0, 0), min(j1, nj), max(i0, 0), min(i1, ni))


def cylinder_occupancy(volume: RasVolume, start_ras, end_ras, radius_mm: float, supersample: int = 4,
                       box=None):
    """Fraction (0..1) of every voxel inside the solid cylinder from ``start_ras`` to ``end_ras``.

    Returns ``(fraction, box)`` where ``fraction`` is float32 over the index box
    ``box = (k0, k1, j0, j1, i0, i1)`` of ``volume``. Voxels whose centre is farther than the half voxel
    diagonal from the cylinder are 0 without supersampling.
    """
    p0 = np.asarray(start_ras, float)
    p1 = np.asarray(end_ras, float)
    axis = p1 - p0
    length = float(np.linalg.norm(axis))
    axis = axis / length
    if box is None:
        box = _ijk_box(volume, np.vstack([p0, p1]), radius_mm + 2 * float(volume.spacing.max()))
    k0, k1, j0, j1, i0, i1 = box
    frac = np.zeros((max(k1 - k0, 0), max(j1 - j0, 0), max(i1 - i0, 0)), np.float32)
    if frac.size == 0:
        return frac, box
    kk, jj, ii = np.meshgrid(np.arange(k0, k1), np.arange(j0, j1), np.arange(i0, i1), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(float)
    ras = volume.ijk_to_ras_points(ijk)
    rel = ras - p0
    t = rel @ axis
    radial = np.linalg.norm(rel - np.outer(t, axis), axis=1)
    half_diag = 0.5 * float(np.linalg.norm(volume.spacing))
    sd = np.maximum.reduce([radial - radius_mm, -t, t - length])
    near = sd <= half_diag
    inside_full = sd <= -half_diag
    flat = frac.ravel()
    flat[inside_full] = 1.0
    cand = np.flatnonzero(near & ~inside_full)
    if cand.size:
        n = int(supersample)
        off = (np.arange(n) + 0.5) / n - 0.5
        oi, oj, ok = np.meshgrid(off, off, off, indexing="ij")
        offsets = np.stack([oi.ravel(), oj.ravel(), ok.ravel()], axis=1)  # (n^3, 3) in ijk
        m3 = volume.ijk_to_ras[:3, :3]
        off_ras = offsets @ m3.T
        counts = np.zeros(cand.size, np.float32)
        chunk = max(1, 200000 // offsets.shape[0])
        for s in range(0, cand.size, chunk):
            c = cand[s:s + chunk]
            pts = rel[c][:, None, :] + off_ras[None, :, :]
            tt = pts @ axis
            rr2 = np.einsum("abc,abc->ab", pts, pts) - tt * tt
            inside = (tt >= 0) & (tt <= length) & (rr2 <= radius_mm * radius_mm)
            counts[s:s + chunk] = inside.mean(axis=1)
        flat[cand] = counts
    return frac.reshape(kk.shape), box


def simulate_confirmation_ct(ct: RasVolume, planned_entry_ras, planned_target_ras, needle=None, *,
                             outer_diameter_mm: float | None = None, lateral_error_mm: float = 0.0,
                             depth_error_mm: float = 0.0, lateral_direction=None, outside_length_mm: float = 15.0,
                             metal_hu: float = 12000.0, psf_sigma_mm: float = 0.5,
                             slice_profile_fraction: float = 0.25, streaks: bool = True,
                             streak_amplitude_hu: float = 60.0, noise_sd_hu: float = 8.0, supersample: int = 4,
                             seed: int = 0) -> SimulatedConfirmation:
    """Draw a metal needle into a copy of ``ct`` (HU) and return it with the truth.

    ``lateral_error_mm`` moves the actual tip perpendicular to the planned line (direction
    ``lateral_direction`` projected perpendicular, else random from ``seed``), ``depth_error_mm`` moves it
    along the planned direction (positive = deeper than the target). ``metal_hu`` is the value of a voxel
    completely filled with needle (steel lies far above the scanner's range, so the default saturates in
    voxels mostly filled with metal); partial voxels get the occupancy-weighted mixture; the result is
    clipped at 3071 HU. Blur: Gaussian in-plane ``psf_sigma_mm`` and along the slice direction
    ``sqrt(psf_sigma_mm**2 + (slice_profile_fraction * slice spacing)**2)`` (a smooth slice sensitivity
    profile on top of the box integration). Noise (``noise_sd_hu``) and streaks are added only in the neighbourhood the needle changed.
    """
    entry = np.asarray(planned_entry_ras, float).reshape(3)
    target = np.asarray(planned_target_ras, float).reshape(3)
    if not (np.all(np.isfinite(entry)) and np.all(np.isfinite(target))):
        raise InputDataError("the planned entry or target is not a finite RAS point; check the plan")
    d = _unit(target - entry)  # entry and target must differ
    if lateral_direction is not None:
        lat = np.asarray(lateral_direction, float)
        _unit(lat - (lat @ d) * d)  # a lateral direction along the path is refused
    geo = resolve_needle_geometry(needle, outer_diameter_mm=outer_diameter_mm)
    radius = 0.5 * geo["outer_diameter_mm"]
    rng = np.random.default_rng(seed)
    tip, lat = placed_tip(entry, target, lateral_error_mm, depth_error_mm, lateral_direction, rng)
    axis = _unit(tip - entry)
    start = entry - outside_length_mm * axis

    spacing_max = float(ct.spacing.max())
    streak_reach = 25.0 if streaks else 0.0
    box = _ijk_box(ct, np.vstack([start, tip]), radius + 4 * psf_sigma_mm + 2 * spacing_max + streak_reach)
    frac, box = cylinder_occupancy(ct, start, tip, radius, supersample=supersample, box=box)
    k0, k1, j0, j1, i0, i1 = box
    sub = ct.array[k0:k1, j0:j1, i0:i1].astype(np.float32)
    if psf_sigma_mm > 0:
        si, sj, sk = ct.spacing
        sigma_k = np.hypot(psf_sigma_mm, slice_profile_fraction * sk)
        sigma_vox = [sigma_k / sk, psf_sigma_mm / sj, psf_sigma_mm / si]
        frac = ndimage.gaussian_filter(frac, sigma_vox, mode="constant")
    out = sub * (1.0 - frac) + np.float32(metal_hu) * frac

    changed_near = frac > 1e-3
    if streaks and streak_amplitude_hu > 0:
        kk, jj, ii = np.meshgrid(np.arange(k0, k1), np.arange(j0, j1), np.arange(i0, i1), indexing="ij")
        ras = ct.ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1))
        rel = ras - start
        t = rel @ axis
        length = float(np.linalg.norm(tip - start))
        tc = np.clip(t, 0, length)
        perp = rel - np.outer(tc, axis)
        r = np.linalg.norm(perp, axis=1)
        u = perpendicular(axis)
        w = np.cross(axis, u)
        phi = np.arctan2(perp @ w, perp @ u)
        # Alternating dark/bright bands radiating from the metal, fading with distance, strongest near the tip.
        along = np.exp(-np.abs(length - tc) / 30.0)
        pattern = np.cos(6 * phi + rng.uniform(0, 2 * np.pi)) * np.exp(-r / 8.0) * (r > radius + 1.0)
        streak = (streak_amplitude_hu * pattern * (0.3 + 0.7 * along)).reshape(out.shape)
        out += streak.astype(np.float32)
        changed_near = changed_near | (np.abs(streak) > 1.0)
    if noise_sd_hu > 0:
        noise = rng.normal(0.0, noise_sd_hu, size=out.shape).astype(np.float32)
        out += noise * changed_near
    out = np.minimum(out, CT_MAX_HU)

    arr = ct.array.copy()
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        arr[k0:k1, j0:j1, i0:i1] = np.clip(np.rint(out), info.min, info.max).astype(arr.dtype)
    else:
        arr[k0:k1, j0:j1, i0:i1] = out.astype(arr.dtype)
    vol = ct.with_array(arr, name=f"{ct.name} (needle)", needle_simulated=True)
    truth = NeedleTruth(planned_entry_ras=entry, planned_target_ras=target, entry_ras=entry, tip_ras=tip, axis=axis,
                        lateral_error_mm=float(lateral_error_mm), depth_error_mm=float(depth_error_mm),
                        lateral_direction=lat, outer_diameter_mm=float(geo["outer_diameter_mm"]))
    logger.debug("simulated needle to tip %s (lateral %.2f mm, depth %.2f mm)", tip, lateral_error_mm, depth_error_mm)
    return SimulatedConfirmation(ct=vol, truth=truth)

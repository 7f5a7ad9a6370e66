"""Brute-force oracle for the hit probability: one sample at a time, explicit voxelisation of the notch.

Deliberately shares no code with ``SmartBiopsyLib.characterise.hitprob``: the notch region comes from the
notch module's own definition (``notch_roi`` at a tip placed so the notch centre sits on the displaced
target; the notch offset and length read from the needle catalogue), each habitat voxel near the notch is
cut into sub-cells and the notch volume inside the region is the sum over region voxels of
(voxel volume x fraction of its sub-cell centres inside the notch). Errors are drawn with other routines
(numpy's multivariate normal, a Rayleigh radius at a uniform angle in a Gram-Schmidt basis).
"""
from __future__ import annotations

import numpy as np

from SmartBiopsyLib.sampling.notch import notch_roi
from TrajectoryPlannerLib.planning.needles import get_needle


def notch_at_centre(centre, axis, needle: str, mode: str):
    """The notch ROI whose centre is ``centre`` (RAS) for ``needle`` fired along ``axis``."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    if mode == "side-notch":
        core = get_needle(needle).core
        tip = centre + (core.notch_offset_from_tip_mm + core.notch_length_mm / 2.0) * axis
    else:  # tip-distal: the region starts at the tip and runs 20 mm further
        tip = centre - 10.0 * axis
    return notch_roi(tip, axis, mode, needle)


def inside_notch(roi, pts) -> np.ndarray:
    """Points (N, 3) inside the notch: 0 <= s <= length along the axis and within the box / cylinder across."""
    rel = [pts[:, d] - roi.start_ras[d] for d in range(3)]
    s = rel[0] * roi.axis[0] + rel[1] * roi.axis[1] + rel[2] * roi.axis[2]
    u = rel[0] * roi.u_axis[0] + rel[1] * roi.u_axis[1] + rel[2] * roi.u_axis[2]
    v = rel[0] * roi.v_axis[0] + rel[1] * roi.v_axis[1] + rel[2] * roi.v_axis[2]
    along = (s >= 0) & (s <= roi.length_mm)
    if roi.shape == "box":
        return along & (np.abs(u) <= roi.half_widths_mm[0]) & (np.abs(v) <= roi.half_widths_mm[1])
    return along & (u * u + v * v <= roi.radius_mm ** 2)


def region_fraction(roi, labels, code: int, sub=(6, 6, 16)) -> tuple[float, float]:
    """(fraction of the voxelised notch volume inside voxels labelled ``code``, voxelised / analytic volume).

    Only voxels whose centre lies within half a voxel diagonal of the notch can overlap it; each of those is
    cut into ``sub`` sub-cells and its overlap is the fraction of sub-cell centres inside the notch.
    """
    lab = np.asarray(labels.array)
    corners = labels.ras_to_ijk_points(roi.corners_ras())
    lo = np.maximum(np.floor(corners.min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 2, lab.shape[::-1])
    offs = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in sub], indexing="ij"), -1).reshape(-1, 3)
    vox_vol = labels.voxel_volume_mm3
    ii, jj, kk = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)  # every voxel of the box
    half_diag = 0.5 * np.linalg.norm(labels.spacing)
    ijk = ijk[roi.signed_distance_bound(labels.ijk_to_ras_points(ijk)) <= half_diag]
    offs_ras = offs @ labels.ijk_to_ras[:3, :3].T  # sub-cell centres relative to the voxel centre (mm)
    pts = (labels.ijk_to_ras_points(ijk)[:, None, :] + offs_ras[None]).reshape(-1, 3)
    f = inside_notch(roi, pts).reshape(len(ijk), len(offs)).mean(axis=1)  # fraction of each voxel inside the notch
    in_region = lab[ijk[:, 2], ijk[:, 1], ijk[:, 0]] == code
    inside_region = float((f * vox_vol)[in_region].sum())
    total = float((f * vox_vol).sum())
    return inside_region / total, total / roi.volume_mm3


def draw(rng, point, reg_cov, lateral_rms, direction):
    """One displaced notch centre and its axis."""
    if direction is None:
        phi = rng.uniform(0.0, 2.0 * np.pi)
        axis = np.array([np.cos(phi), np.sin(phi), 0.0])
    else:
        axis = np.asarray(direction, float) / np.linalg.norm(direction)
    e_reg = rng.multivariate_normal(np.zeros(3), reg_cov)
    a = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    b1 = a - (a @ axis) * axis
    b1 /= np.linalg.norm(b1)
    b2 = np.cross(axis, b1)
    r = rng.rayleigh(lateral_rms / np.sqrt(2.0))
    psi = rng.uniform(0.0, 2.0 * np.pi)
    return np.asarray(point, float) + e_reg + r * (np.cos(psi) * b1 + np.sin(psi) * b2), axis


def brute_force_hit_probability(labels, code, point, reg_cov, lateral_rms, direction, needle, mode, n, seed,
                                min_fraction=0.5):
    """(probability, standard error) from ``n`` explicit samples."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n):
        centre, axis = draw(rng, point, reg_cov, lateral_rms, direction)
        frac, _ = region_fraction(notch_at_centre(centre, axis, needle, mode), labels, code)
        hits += frac >= min_fraction
    p = hits / n
    return p, float(np.sqrt(p * (1 - p) / n))

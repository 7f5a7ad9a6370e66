"""Tumour size from a label map: voxel volume and the prolate-ellipsoid estimate pi/6 * L * W * H.

L >= W >= H are the tumour's extents (mm) along its principal axes (PCA of the voxel centres in RAS mm),
each including one voxel footprint along that axis. Multiregional biopsy needs room for three separated
targets; when the smallest dimension is under ``min_dimension_mm`` (default 50 mm) an eligibility note is
returned (not an error: the radiologist decides).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from SmartBiopsyCoreLib.geometry import RasVolume
from SmartBiopsyCoreLib.errors import InputDataError

logger = logging.getLogger(__name__)


def tumour_mask(volume: RasVolume, label: int | None = None) -> np.ndarray:
    """Boolean mask of the tumour: voxels equal to ``label`` or, when None, all non-zero finite voxels."""
    arr = np.asarray(volume.array)
    if label is None:
        m = np.isfinite(arr) & (arr != 0) if arr.dtype.kind == "f" else arr != 0
    else:
        m = arr == label
    if not m.any():
        what = f"label {label}" if label is not None else "any non-zero voxel"
        raise InputDataError(f"the tumour mask '{volume.name}' is empty (no {what}); segment the tumour first")
    return m


@dataclass
class TumourMeasurement:
    """Tumour size. Volumes in ml, lengths in mm, points and axes in RAS."""

    voxel_count: int
    voxel_volume_ml: float
    ellipsoid_volume_ml: float
    dimensions_mm: list[float]  # L, W, H (descending)
    principal_axes_ras: list[list[float]]  # unit vectors, one per dimension
    centroid_ras: list[float]
    eligible: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_tumour(mask_volume: RasVolume, label: int | None = None, min_dimension_mm: float = 50.0) -> TumourMeasurement:
    """Measure the tumour in ``mask_volume`` (label map on any grid; RAS mm)."""
    mask = tumour_mask(mask_volume, label)
    pts = mask_volume.voxel_centres_ras(mask)
    centroid = pts.mean(axis=0)
    if len(pts) >= 3:
        cov = np.cov((pts - centroid).T)
        evals, evecs = np.linalg.eigh(cov)
        axes = evecs[:, ::-1].T  # rows, largest variance first
    else:
        axes = np.eye(3)
    proj = (pts - centroid) @ axes.T
    step = mask_volume.ijk_to_ras[:3, :3]  # columns: mm vectors of one voxel step along i, j, k
    footprint = np.abs(axes @ step).sum(axis=1)  # extent of one voxel along each principal axis
    dims = proj.max(axis=0) - proj.min(axis=0) + footprint
    order = np.argsort(dims)[::-1]
    dims, axes = dims[order], axes[order]
    voxel_ml = float(mask.sum() * mask_volume.voxel_volume_mm3 / 1000.0)
    ell_ml = float(math.pi / 6.0 * dims[0] * dims[1] * dims[2] / 1000.0)
    notes = []
    eligible = bool(dims[2] >= min_dimension_mm)
    if not eligible:
        notes.append(f"smallest dimension {dims[2]:.0f} mm is under {min_dimension_mm:.0f} mm: there may not be room "
                     "for three separated biopsy targets")
    logger.info("tumour: %d voxels, %.1f ml (ellipsoid %.1f ml), %s mm", mask.sum(), voxel_ml, ell_ml,
                " x ".join(f"{d:.0f}" for d in dims))
    return TumourMeasurement(int(mask.sum()), voxel_ml, ell_ml, [float(d) for d in dims],
                             [[float(v) for v in a] for a in axes], [float(v) for v in centroid], eligible, notes)

"""The patient body in a CT: one threshold, one function, used by fusion, planning and the report.

The body is the largest connected component above :data:`BODY_HU_THRESHOLD` with its internal holes (lungs,
bowel gas) filled; the CT's first and last slices count as body so that a lung cut by the field of view
is still a hole. The table is a separate component and drops out. World frame: RAS mm; HU.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.geometry import RasVolume

logger = logging.getLogger(__name__)

#: CT body threshold (HU): fat is about -100, lung about -850, air -1000; -300 keeps fat and skin in the
#: body and leaves air and (after hole filling) lung as background or holes.
BODY_HU_THRESHOLD = -300.0


def _sitk_mask(mask: np.ndarray, spacing):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    img.SetSpacing([float(s) for s in spacing])
    return img


def largest_component(mask: np.ndarray, spacing=(1.0, 1.0, 1.0), threads: int | None = None) -> np.ndarray:
    """The largest face-connected component of a boolean (k, j, i) mask (SimpleITK default connectivity)."""
    import SimpleITK as sitk

    if not mask.any():
        return mask.copy()
    cc = sitk.ConnectedComponentImageFilter()
    if threads:
        cc.SetNumberOfThreads(int(threads))
    rel = sitk.RelabelComponentImageFilter()
    rel.SetSortByObjectSize(True)
    out = sitk.GetArrayFromImage(rel.Execute(cc.Execute(_sitk_mask(mask, spacing))))
    return out == 1


def body_mask_array(ct: RasVolume, threshold_hu: float = BODY_HU_THRESHOLD, table_opening_mm: float = 0.0,
                    threads: int | None = None) -> np.ndarray:
    """Patient body (bool array, k, j, i, on ``ct``'s grid): largest component above ``threshold_hu``, holes filled.

    ``table_opening_mm`` > 0 first opens the thresholded mask with a ball of that radius (mm), which breaks
    thin body-table contacts. Raises :class:`InputDataError` when nothing is above the threshold.
    """
    import SimpleITK as sitk

    spacing = ct.spacing
    m = np.asarray(ct.array) > threshold_hu
    if table_opening_mm > 0:
        radius = [max(1, int(round(table_opening_mm / s))) for s in spacing]
        m = sitk.GetArrayFromImage(sitk.BinaryMorphologicalOpening(_sitk_mask(m, spacing), radius)) > 0
    m = largest_component(m, spacing, threads)
    if not m.any():
        raise InputDataError(f"no body found in the CT (nothing above {threshold_hu:.0f} HU); check that the CT is in HU")
    # Treat the first/last slices as body so holes cut by them (lung, bowel) are still filled.
    padded = np.pad(m, ((1, 1), (0, 0), (0, 0)), constant_values=True)
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(_sitk_mask(padded, spacing), fullyConnected=False)) > 0
    return filled[1:-1]


def body_mask(ct: RasVolume, threshold_hu: float = BODY_HU_THRESHOLD, table_opening_mm: float = 0.0,
              threads: int | None = None) -> RasVolume:
    """The body as a uint8 mask volume (1 = body) on ``ct``'s grid; see :func:`body_mask_array`."""
    arr = body_mask_array(ct, threshold_hu, table_opening_mm, threads)
    return ct.with_array(arr.astype(np.uint8), name=f"{ct.name} body")


def subsampled(ct: RasVolume, stride_kji) -> RasVolume:
    """Every ``stride_kji``-th voxel of ``ct`` as a volume with the matching IJK->RAS (for quick outlines)."""
    s = np.asarray(stride_kji, int)
    arr = np.asarray(ct.array)[::s[0], ::s[1], ::s[2]]
    m = ct.ijk_to_ras.copy()
    m[:3, :3] = m[:3, :3] * s[::-1][None, :]
    return RasVolume(arr, m, ct.name, dict(ct.meta))

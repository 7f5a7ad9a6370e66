"""The patient body in a CT: one threshold, one function, used by fusion, planning and the report.

The body is the largest connected component above :data:`BODY_HU_THRESHOLD` with its internal holes (lungs,
bowel gas) filled; the CT's first and last slices count as body so that a lung cut by the field of view
is still a hole. The table is a separate component and drops out. World frame: RAS mm; HU.
"""
from __future__ import annotations

import logging

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


#: Up to this many components their sizes are counted one by one; above, SimpleITK sorts them by size.
_FEW_COMPONENTS = 3


def label_components(mask: np.ndarray, threads: int | None = None):
    """Face-connected components of a boolean (k, j, i) mask: (SimpleITK label image, uint32 label array view of
    it, number of components). Keep the image alive as long as the view is used."""
    import SimpleITK as sitk

    cc = sitk.ConnectedComponentImageFilter()
    if threads:
        cc.SetNumberOfThreads(int(threads))
    img = cc.Execute(sitk.GetImageFromArray(mask.view(np.uint8)))
    return img, sitk.GetArrayViewFromImage(img), int(cc.GetObjectCount())


def bbox_slices(mask: np.ndarray) -> tuple:
    """Index slices (k, j, i) of the bounding box of the True voxels of a non-empty mask (two passes: the
    occupied slices, then one (j, i) plane over them)."""
    kk = np.flatnonzero(mask.any(axis=(1, 2)))
    plane = mask[kk[0]:kk[-1] + 1].any(axis=0)
    jj, ii = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return tuple(slice(int(a[0]), int(a[-1]) + 1) for a in (kk, jj, ii))


def largest_component(mask: np.ndarray, spacing=(1.0, 1.0, 1.0), threads: int | None = None) -> np.ndarray:
    """The largest face-connected component of a boolean (k, j, i) mask (a new array; ``spacing`` is unused)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return mask.copy()
    return _largest_component(mask, threads)


def _largest_component(mask: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Largest component of a non-empty mask (equal sizes: the lower label)."""
    import SimpleITK as sitk

    mask = np.ascontiguousarray(mask, bool)
    img, lab, n = label_components(mask, threads)
    if n == 1:
        return mask.copy()
    if n <= _FEW_COMPONENTS:
        counts = [int(np.count_nonzero(lab == v)) for v in range(1, n + 1)]
        return lab == (int(np.argmax(counts)) + 1)
    rel = sitk.RelabelComponentImageFilter()
    rel.SetSortByObjectSize(True)
    if threads:
        rel.SetNumberOfThreads(int(threads))
    sorted_img = rel.Execute(img)  # keep the image alive while its array view is read
    return sitk.GetArrayViewFromImage(sorted_img) == 1


def _fill_holes(m: np.ndarray, box: tuple, threads: int | None = None) -> np.ndarray:
    """``m`` with every face-connected background region that reaches no j/i face of the array filled; the
    first and last k slices count as foreground (so holes they cut are filled). ``box``: slices around ``m``.

    Equals SimpleITK's BinaryFillhole (fullyConnected off) of ``m`` padded with one foreground slice before
    the first and after the last k slice, computed on ``box`` grown by one voxel: outside the box every
    background voxel reaches a j/i face along a line of background (or a whole background slice)."""
    shape = m.shape
    lo = np.array([s.start for s in box])
    hi = np.array([s.stop for s in box])
    q = np.ones(tuple(int(v) for v in hi - lo + 2), bool)  # background of the padded mask, built directly
    np.logical_not(m[box], out=q[1:-1, 1:-1, 1:-1])
    if lo[0] == 0:
        q[0] = False
    if hi[0] == shape[0]:
        q[-1] = False
    _img, bg, _ = label_components(q, threads)
    outside = bg[1, 0, 0]  # the j = lo - 1 ring is background that reaches a j/i face of the array
    out = np.zeros(shape, bool)
    np.not_equal(bg[1:-1, 1:-1, 1:-1], outside, out=out[box])
    return out


def body_mask_array(ct: RasVolume, threshold_hu: float = BODY_HU_THRESHOLD, table_opening_mm: float = 0.0,
                    threads: int | None = None) -> np.ndarray:
    """Patient body (bool array, k, j, i, on ``ct``'s grid): largest component above ``threshold_hu``, holes filled.

    ``table_opening_mm`` > 0 first opens the thresholded mask with a ball of that radius (mm), which breaks
    thin body-table contacts. Raises :class:`InputDataError` when nothing is above the threshold.
    Components and holes are face-connected; holes are filled in 3-D (the first and last slices count as
    body) on the body's bounding box.
    """
    import SimpleITK as sitk

    spacing = ct.spacing
    m = np.asarray(ct.array) > threshold_hu
    if table_opening_mm > 0:
        radius = [max(1, int(round(table_opening_mm / s))) for s in spacing]
        m = sitk.GetArrayFromImage(sitk.BinaryMorphologicalOpening(_sitk_mask(m, spacing), radius)) > 0
    if not m.any():
        raise InputDataError(f"no body found in the CT (nothing above {threshold_hu:.0f} HU); check that the CT is in HU")
    m = _largest_component(m, threads)
    return _fill_holes(m, bbox_slices(m), threads)


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

"""Local intensity refinement of the MRI -> CT registration in a box around the tumour.

The capsule (landmark) transform is exact where the capsules are - on the skin. Around a deep tumour the
tissue may have deformed between the two scans. This module re-registers the images by mutual information
only inside a box around the tumour (the tumour mask mapped to the CT by the landmark transform, plus a
margin), starting from the landmark transform, with one of two engines:

- ``"simpleitk"`` (default; bundled with Slicer): rigid Mattes-MI, :func:`refine.refine_registration`
  restricted to the box by a CT mask;
- ``"elastix"`` (``itk-elastix``, optional; not bundled with desktop Slicer): the elastix default rigid map on
  the CT cropped to the box. Absent package: :class:`LocalRefinementUnavailable` with one sentence.

Acceptance (the landmark transform is kept otherwise, with the reason):

1. mutual information in the box improves;
2. the correction at the tumour points (how far the refined transform moves them compared with the
   landmark transform) exceeds ``min_correction_mm`` (default 1 mm, about twice the engine's error on rigid
   phantom cases: a smaller change is noise, and the landmark transform is kept) and stays within
   ``max_correction_mm`` (default 5 mm; larger soft-tissue shifts are implausible, more likely a wrong optimum);
3. the capsules constrain it: every capsule pair still fits within its localisation tolerance plus
   ``max_skin_deformation_mm`` (default 2 mm) - a local rigid transform cannot rotate the whole body away
   from the capsules.

On the phantom neither engine is accepted and neither would help: the tumour deformation varies within the
tumour, so even the rigid / affine transform fitted to the true tumour positions leaves 1.21 / 1.03 mm mean
(landmark 1.47 mm, deformed seeds 100-109), and the box MI prefers the landmark pose to that rigid truth fit -
see ``Testing/benchmarks/bench_fusion_error.py``.

Whether accepted or not, the candidate's disagreement with the landmark transform at each target feeds the
error model (:mod:`RegistrationFusionLib.registration.error_model`). Matrices are 4x4 RAS (MRI points to
CT points); points are RAS mm.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from RegistrationFusionLib.errors import RegistrationFusionError
from RegistrationFusionLib.registration.landmarks import apply_transform
from SmartBiopsyCoreLib.geometry import RasVolume

logger = logging.getLogger(__name__)

ENGINES = ("simpleitk", "elastix")


class LocalRefinementUnavailable(RegistrationFusionError):
    """The requested engine is not installed."""


@dataclass
class LocalRefinement:
    """Outcome of the local refinement. ``matrix`` is the transform to use around the tumour (the candidate
    when ``accepted``, else the landmark one); ``candidate_matrix`` is what the engine found."""

    engine: str
    matrix: np.ndarray
    landmark_matrix: np.ndarray
    candidate_matrix: np.ndarray
    accepted: bool
    reason: str
    box_lo_ras: list
    box_hi_ras: list
    mi_landmark: float
    mi_candidate: float
    correction_mm: float                       # max over tumour points, candidate vs landmark
    capsule_residual_mm: list = field(default_factory=list)
    capsule_allowed_mm: list = field(default_factory=list)
    seconds: float = 0.0

    def disagreement_mm(self, points_ct) -> np.ndarray:
        """|candidate(x) - landmark(x)| (mm) for CT-RAS points given under the landmark transform."""
        p = np.asarray(points_ct, float).reshape(-1, 3)
        d = self.candidate_matrix @ np.linalg.inv(self.landmark_matrix)
        return np.linalg.norm(apply_transform(d, p) - p, axis=1)

    def to_dict(self) -> dict:
        return {"engine": self.engine, "accepted": bool(self.accepted), "reason": self.reason,
                "matrix_mri_to_ct_ras": np.asarray(self.matrix).tolist(),
                "candidate_matrix_mri_to_ct_ras": np.asarray(self.candidate_matrix).tolist(),
                "box_ct_ras_mm": [list(map(float, self.box_lo_ras)), list(map(float, self.box_hi_ras))],
                "mi_landmark": float(self.mi_landmark), "mi_candidate": float(self.mi_candidate),
                "correction_mm": float(self.correction_mm),
                "capsule_residual_mm": [float(v) for v in self.capsule_residual_mm],
                "capsule_allowed_mm": [float(v) for v in self.capsule_allowed_mm], "seconds": float(self.seconds)}


def tumour_box_ct(tumour_mri: RasVolume, mri_to_ct: np.ndarray, margin_mm: float = 15.0):
    """(lo, hi) CT-RAS corners of the tumour mask mapped by ``mri_to_ct``, grown by ``margin_mm``; and the
    tumour points (every few voxels, CT RAS) used to measure corrections."""
    if tumour_mri is None or not np.any(tumour_mri.array):
        raise RegistrationFusionError("the tumour segmentation is empty; segment the tumour before the local refinement")
    pts = tumour_mri.voxel_centres_ras(tumour_mri.array > 0)
    pts_ct = apply_transform(mri_to_ct, pts[:: max(1, len(pts) // 2000)])
    return pts_ct.min(axis=0) - margin_mm, pts_ct.max(axis=0) + margin_mm, pts_ct


def _crop(vol: RasVolume, lo, hi) -> RasVolume:
    ijk = vol.ras_to_ijk_points(np.array([lo, hi], float))
    a = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, np.array(vol.array.shape[::-1]) - 1)
    b = np.clip(np.ceil(ijk.max(axis=0)).astype(int), 0, np.array(vol.array.shape[::-1]) - 1)
    if np.any(b - a < 4):
        raise RegistrationFusionError("the tumour lies outside the CT; check the CT covers the tumour")
    sub = vol.array[a[2]:b[2] + 1, a[1]:b[1] + 1, a[0]:b[0] + 1]
    m = vol.ijk_to_ras.copy()
    m[:3, 3] = vol.ijk_to_ras_points(a[None].astype(float))[0]
    return RasVolume(np.ascontiguousarray(sub), m, vol.name, dict(vol.meta))


def _simpleitk_rigid(ct_box: RasVolume, mri: RasVolume, m0: np.ndarray, progress, should_cancel) -> np.ndarray:
    return _simpleitk_rigid_result(ct_box, mri, m0, progress, should_cancel).candidate_matrix


def _simpleitk_rigid_result(ct_box: RasVolume, mri: RasVolume, m0: np.ndarray, progress, should_cancel):
    """The rigid refinement's whole result: its ``mi_initial``/``mi_final`` are the box MI (32 bins, no mask) of
    ``m0`` and of the candidate, the values :func:`refine_local` needs (see :data:`_REFINE_BINS`)."""
    from RegistrationFusionLib.registration.refine import refine_registration

    return refine_registration(ct_box, mri, m0, shrink=(2, 1), smoothing_mm=(1.0, 0.0), sampling=0.5,
                               max_samples=60_000, max_step_mm=1.0, bins=_REFINE_BINS, progress=progress,
                               should_cancel=should_cancel)


# histogram bins of the SimpleITK engine's rigid refinement; its MI before/after equals refine_local's own box MI
# for the same number of bins (SimpleITK's metric evaluation uses every box voxel whatever the sampling setting)
_REFINE_BINS = 32


def _elastix_rigid(ct_box: RasVolume, mri: RasVolume, m0: np.ndarray, progress, should_cancel) -> np.ndarray:
    try:
        import itk
        if not hasattr(itk, "elastix_registration_method"):
            raise ImportError
    except ImportError:
        raise LocalRefinementUnavailable("the elastix engine needs the itk-elastix package, which this Slicer does "
                                         "not include; use the SimpleITK engine or pip install itk-elastix") from None
    import SimpleITK as sitk

    from RegistrationFusionLib.registration.refine import ras_from_itk

    def to_itk(vol):
        s = vol.to_sitk()
        img = itk.image_from_array(np.ascontiguousarray(vol.array.astype(np.float32)))
        img.SetOrigin(s.GetOrigin())
        img.SetSpacing(s.GetSpacing())
        img.SetDirection(itk.matrix_from_array(np.array(s.GetDirection()).reshape(3, 3)))
        return img

    if progress:
        progress(0.1, "elastix rigid")
    moved = RasVolume(mri.array.astype(np.float32), m0 @ mri.ijk_to_ras, mri.name)  # start = landmark, exactly
    po = itk.ParameterObject.New()
    pm = po.GetDefaultParameterMap("rigid", 2)
    pm["AutomaticTransformInitialization"] = ["false"]
    pm["MaximumNumberOfIterations"] = ["200"]
    po.AddParameterMap(pm)
    _, tpo = itk.elastix_registration_method(to_itk(ct_box), to_itk(moved), parameter_object=po,
                                             log_to_console=False)
    p = [float(v) for v in tpo.GetParameter(0, "TransformParameters")]
    c = [float(v) for v in tpo.GetParameter(0, "CenterOfRotationPoint")]
    e = sitk.Euler3DTransform()
    e.SetCenter(c)
    e.SetRotation(*p[:3])
    e.SetTranslation(p[3:6])
    return ras_from_itk(e) @ m0


def acceptance_reasons(mi_landmark: float, mi_candidate: float, correction_mm, capsule_residual_mm,
                       capsule_allowed_mm, max_correction_mm: float = 5.0, min_correction_mm: float = 1.0) -> list[str]:
    """Why a local candidate must not be used (empty list: accept). Distances in mm, MI in nats; see the
    module docstring for the three rules."""
    corr = np.asarray(correction_mm, float).reshape(-1)
    resid = np.asarray(capsule_residual_mm, float).reshape(-1)
    allowed = np.asarray(capsule_allowed_mm, float).reshape(-1)
    reasons = []
    if not mi_candidate > mi_landmark:
        reasons.append(f"mutual information in the tumour box did not improve ({mi_landmark:.4f} -> "
                       f"{mi_candidate:.4f} nats)")
    if not corr.size or not corr.max() <= max_correction_mm:
        reasons.append(f"it would move tumour points by up to {corr.max() if corr.size else float('nan'):.1f} mm, "
                       f"more than the plausible {max_correction_mm:.1f} mm")
    elif not corr.max() > min_correction_mm:
        reasons.append(f"its correction (at most {corr.max():.2f} mm) is within the refinement's own precision "
                       f"({min_correction_mm:.1f} mm)")
    if resid.size != allowed.size:
        reasons.append("the capsule residuals and tolerances do not pair up")
    elif resid.size and np.any(~(resid <= allowed)):
        k = int(np.argmax(resid - allowed))
        reasons.append(f"it leaves capsule {k} {resid[k]:.1f} mm from its CT position (allowed {allowed[k]:.1f} mm)")
    return reasons


def refine_local(ct: RasVolume, mri: RasVolume, landmark_matrix: np.ndarray, tumour_mri: RasVolume, *,
                 engine: str = "simpleitk", margin_mm: float = 15.0, capsules_mri: np.ndarray | None = None,
                 capsules_ct: np.ndarray | None = None, capsule_allowed_mm=None, max_correction_mm: float = 5.0,
                 max_skin_deformation_mm: float = 2.0, min_correction_mm: float = 1.0, bins: int = 32,
                 progress: Callable[[float, str], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> LocalRefinement:
    """Refine ``landmark_matrix`` (MRI->CT, 4x4 RAS) by mutual information in a box around the tumour.

    ``tumour_mri``: tumour mask on an MRI grid (MRI world). ``capsules_mri``/``capsules_ct``: the paired capsule
    centres (RAS mm) and ``capsule_allowed_mm`` their tolerance (scalar or per pair, mm) for the capsule
    constraint (skipped when not given). See the module docstring for the acceptance rules.
    """
    from RegistrationFusionLib.registration.refine import mutual_information

    if engine not in ENGINES:
        raise RegistrationFusionError(f"unknown local refinement engine '{engine}'; use one of {', '.join(ENGINES)}")
    t0 = time.perf_counter()
    m0 = np.asarray(landmark_matrix, float)
    lo, hi, pts = tumour_box_ct(tumour_mri, m0, margin_mm)
    ct_box = _crop(ct, lo, hi)
    if engine == "simpleitk" and bins == _REFINE_BINS:
        # the refinement already evaluated the box MI of m0 and of its candidate with these bins: reuse both
        out = _simpleitk_rigid_result(ct_box, mri, m0, progress, should_cancel)
        cand, mi0, mi1 = out.candidate_matrix, out.mi_initial, out.mi_final
    else:
        run = _simpleitk_rigid if engine == "simpleitk" else _elastix_rigid
        cand = run(ct_box, mri, m0, progress, should_cancel)
        mi0 = mutual_information(ct_box, mri, m0, bins=bins, max_samples=200_000)
        mi1 = mutual_information(ct_box, mri, cand, bins=bins, max_samples=200_000)
    corr = np.linalg.norm(apply_transform(cand @ np.linalg.inv(m0), pts) - pts, axis=1)
    resid, allowed = np.zeros(0), np.zeros(0)
    if capsules_mri is not None and capsules_ct is not None and len(capsules_mri):
        cm = np.asarray(capsules_mri, float).reshape(-1, 3)
        resid = np.linalg.norm(apply_transform(cand, cm) - np.asarray(capsules_ct, float).reshape(-1, 3), axis=1)
        tol = 1.0 if capsule_allowed_mm is None else capsule_allowed_mm
        allowed = np.broadcast_to(np.asarray(tol, float), (len(cm),)) + max_skin_deformation_mm
    reasons = acceptance_reasons(mi0, mi1, corr, resid, allowed, max_correction_mm, min_correction_mm)
    ok = not reasons
    reason = (f"local {engine} refinement accepted: MI {mi0:.4f} -> {mi1:.4f} nats, tumour points moved up to "
              f"{corr.max():.2f} mm" if ok else f"local {engine} refinement not used: " + "; ".join(reasons))
    logger.info(reason)
    return LocalRefinement(engine, cand if ok else m0, m0, cand, ok, reason, lo.tolist(), hi.tolist(), mi0, mi1,
                           float(corr.max()), resid.tolist(), np.asarray(allowed).tolist(), time.perf_counter() - t0)

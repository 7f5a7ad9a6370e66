"""The whole fusion step in one call: capsules -> pairing -> landmark registration -> refinement -> QA.

Inputs are :class:`~SmartBiopsyCoreLib.geometry.RasVolume` (CT in HU, one anatomical MRI); the result
holds the MRI->CT 4x4 RAS matrix (MRI-world points to CT-world points) and every intermediate result.
No files are written here (see ``SmartBiopsyLib.cli.cmd_register`` for that).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from RegistrationFusionLib.registration import landmarks, qa, refine
from RegistrationFusionLib.errors import RegistrationFusionError
from SmartBiopsyCoreLib.body import BODY_HU_THRESHOLD, body_mask
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.geometry import RasVolume

logger = logging.getLogger(__name__)


@dataclass
class FusionResult:
    """Everything the fusion step produced; ``matrix`` is the MRI->CT transform to use (RAS)."""

    matrix: np.ndarray
    correspondence: landmarks.Correspondence
    landmark: landmarks.PointRegistration
    refinement: refine.RefinementResult | None
    report: qa.QAReport
    detection_ct: object = None
    detection_mri: object = None

    def to_dict(self) -> dict:
        d = {"matrix_mri_to_ct_ras": np.asarray(self.matrix).tolist(), "qa": self.report.to_dict(),
             "landmark": self.landmark.to_dict(), "correspondence": self.correspondence.to_dict(),
             "refinement": None if self.refinement is None else self.refinement.to_dict()}
        for key, det in (("capsules_ct", self.detection_ct), ("capsules_mri", self.detection_mri)):
            if det is not None and hasattr(det, "to_dict"):
                d[key] = det.to_dict()
        return qa._clean(d)


def _fle_of(det, default):
    cov = getattr(det, "fle_cov_ras", None)
    if cov is not None:
        return np.asarray(cov, float)
    fle = getattr(det, "fle_mm", None)  # per-axis SD along R, A, S
    return default if fle is None else np.asarray(fle, float)


def capsule_tolerance_mm(reg: landmarks.PointRegistration, factor: float = 3.0, floor_mm: float = 1.0) -> np.ndarray:
    """How far refinement may move each paired MRI capsule (mm): factor x combined RMS FLE, at least ``floor_mm``."""
    r = reg.matrix[:3, :3] / reg.scale
    cov = reg.cov_fixed + np.einsum("ij,njk,lk->nil", r, reg.cov_moving, r)
    return np.maximum(factor * np.sqrt(np.trace(cov, axis1=1, axis2=2)), floor_mm)


def body_mask_ct(ct: RasVolume, threshold_hu: float = BODY_HU_THRESHOLD) -> RasVolume:
    """The patient body of the CT as a uint8 mask on the CT grid (the core's one body mask: largest component
    above ``threshold_hu`` HU, holes filled); the mutual-information metric is evaluated inside it."""
    try:
        return body_mask(ct, threshold_hu)
    except InputDataError as exc:
        raise RegistrationFusionError(str(exc)) from None


def fuse_ct_mri(ct: RasVolume, mri: RasVolume, *, targets_ct=None, capsules_ct=None, capsules_mri=None,
                detect_options: dict | None = None, match_options: dict | None = None,
                register_options: dict | None = None, do_refine: bool = True, refine_options: dict | None = None,
                use_body_mask: bool = True, thresholds: qa.QAThresholds | None = None,
                progress: Callable[[float, str], None] | None = None,
                should_cancel: Callable[[], bool] | None = None,
                on_landmark: Callable[[landmarks.PointRegistration], None] | None = None) -> FusionResult:
    """Register an MRI to the planning CT through the skin capsules, then refine by mutual information.

    ``on_landmark``: called with the capsule (landmark) registration as soon as it exists, before the intensity
    refinement (e.g. to start work that needs only the landmark result while the refinement runs).

    ``capsules_ct``/``capsules_mri``: detections (objects with ``centres_ras`` and ``fle_cov_ras``/``fle_mm``
    as returned by ``capsules.detect_capsules``) or plain (N, 3) RAS arrays; detected when omitted.
    ``targets_ct``: {name: point} or (M, 3) CT-RAS points for predicted TRE and refinement displacement.
    Raises :class:`RegistrationFusionError` subclasses with a message for the user.
    """
    def report(f, msg):
        if progress:
            progress(float(f), msg)
        if should_cancel and should_cancel():
            raise RegistrationFusionError("registration was cancelled; nothing was changed")

    sub = lambda lo, hi: (lambda f, m: report(lo + (hi - lo) * f, m))  # noqa: E731
    if capsules_ct is None or capsules_mri is None:
        from RegistrationFusionLib.capsules.detection import detect_capsules
    if capsules_ct is None:
        capsules_ct = detect_capsules(ct, "ct", progress=sub(0.0, 0.2), should_cancel=should_cancel,
                                      **(detect_options or {}))
    if capsules_mri is None:
        capsules_mri = detect_capsules(mri, "mr", progress=sub(0.2, 0.4), should_cancel=should_cancel,
                                       **(detect_options or {}))
    pts_ct = np.asarray(getattr(capsules_ct, "centres_ras", capsules_ct), float).reshape(-1, 3)
    pts_mr = np.asarray(getattr(capsules_mri, "centres_ras", capsules_mri), float).reshape(-1, 3)
    report(0.4, "pairing capsules")
    corr, reg = landmarks.register_capsules(pts_ct, pts_mr, fle_ct=_fle_of(capsules_ct, 0.3),
                                            fle_mri=_fle_of(capsules_mri, 0.5), match_options=match_options,
                                            **(register_options or {}))
    if on_landmark is not None:
        on_landmark(reg)
    named = targets_ct
    tgt_arr = None
    if targets_ct is not None:
        tgt_arr = (np.array([np.asarray(v, float) for v in targets_ct.values()]) if isinstance(targets_ct, dict)
                   else np.asarray(targets_ct, float).reshape(-1, 3))
    ref = None
    if do_refine:
        report(0.45, "intensity refinement")
        opts = dict(refine_options or {})
        opts.setdefault("capsules_mri", reg.moving_points[reg.used])
        opts.setdefault("capsules_ct", reg.fixed_points[reg.used])
        # the refined transform must still fit every capsule pair within ~2x its combined localisation error
        opts.setdefault("capsule_allowed_mm", capsule_tolerance_mm(reg, factor=2.0, floor_mm=0.5)[reg.used])
        if use_body_mask and "ct_mask" not in opts:
            opts["ct_mask"] = body_mask_ct(ct)
        ref = refine.refine_registration(ct, mri, reg.matrix, targets_ct=tgt_arr, progress=sub(0.45, 0.95),
                                         should_cancel=should_cancel, **opts)
    rep = qa.build_report(reg, named, correspondence=corr, refinement=ref, thresholds=thresholds)
    report(1.0, "registration done")
    matrix = reg.matrix if ref is None else ref.matrix
    return FusionResult(matrix, corr, reg, ref, rep,
                        capsules_ct if hasattr(capsules_ct, "centres_ras") else None,
                        capsules_mri if hasattr(capsules_mri, "centres_ras") else None)


# ------------------------------------------------------------------------------------------------
# capsule-free fusion and the automatic fallback
# ------------------------------------------------------------------------------------------------
@dataclass
class IntensityFusion:
    """A capsule-free (intensity-only) fusion: ``matrix`` MRI->CT (RAS), its result and its QA report.

    ``fallback_reason``: why the capsules were not used (the user asked, or fewer than three pairs).
    Only returned when accepted; a refused one raises :class:`intensity.IntensityFusionRefused`.
    """

    matrix: np.ndarray
    intensity: object
    report: qa.QAReport
    fallback_reason: str
    method: str = "intensity"

    def to_dict(self) -> dict:
        return qa._clean({"method": "intensity-only", "matrix_mri_to_ct_ras": np.asarray(self.matrix).tolist(),
                          "fallback_reason": self.fallback_reason, "qa": self.report.to_dict(),
                          "intensity": self.intensity.to_dict()})


def fuse_with_fallback(ct: RasVolume, mri: RasVolume, *, use_capsules: bool = True, targets_ct=None,
                       detect_options: dict | None = None, intensity_options: dict | None = None,
                       thresholds: qa.QAThresholds | None = None,
                       progress: Callable[[float, str], None] | None = None,
                       should_cancel: Callable[[], bool] | None = None, **capsule_kwargs):
    """Capsule fusion (:func:`fuse_ct_mri`) when at least three capsule pairs exist, else capsule-free fusion.

    Falls back to :func:`intensity.register_intensity` when ``use_capsules`` is False, when one image holds
    no capsule, fewer than three, or fewer than three could be paired. Every other capsule problem
    (ambiguous pairing, collinear capsules, bad input) is raised as before. Returns a
    :class:`FusionResult` or an accepted :class:`IntensityFusion`; a refused capsule-free fusion raises
    :class:`intensity.IntensityFusionRefused` (one sentence, with the reason the capsules were not used).
    ``capsule_kwargs`` go to :func:`fuse_ct_mri`.
    """
    from RegistrationFusionLib.capsules.detection import NoCapsulesFound, detect_capsules
    from RegistrationFusionLib.registration import intensity
    from RegistrationFusionLib.registration.landmarks import CorrespondenceError

    sub = lambda lo, hi: (None if progress is None else (lambda f, m: progress(lo + (hi - lo) * f, m)))  # noqa: E731
    why = "capsules not used (--no-capsules)"
    if use_capsules:
        try:
            det_ct = detect_capsules(ct, "ct", progress=sub(0.0, 0.15), should_cancel=should_cancel,
                                     **(detect_options or {}))
            det_mr = detect_capsules(mri, "mr", progress=sub(0.15, 0.3), should_cancel=should_cancel,
                                     **(detect_options or {}))
            if min(len(det_ct), len(det_mr)) < 3:
                raise _FewCapsules(f"only {len(det_ct)} CT and {len(det_mr)} MRI capsules were found")
            return fuse_ct_mri(ct, mri, targets_ct=targets_ct, capsules_ct=det_ct, capsules_mri=det_mr,
                               thresholds=thresholds, progress=sub(0.3, 1.0), should_cancel=should_cancel,
                               **capsule_kwargs)
        except (NoCapsulesFound, _FewCapsules) as exc:
            why = str(exc)
        except CorrespondenceError as exc:
            if getattr(exc, "n_pairs", 3) >= 3:
                raise
            why = str(exc)
        logger.warning("fewer than three capsule pairs (%s): capsule-free fusion", why)
    res = intensity.register_intensity(ct, mri, progress=sub(0.3 if use_capsules else 0.0, 1.0),
                                       should_cancel=should_cancel, **(intensity_options or {}))
    if not res.accepted:
        exc = intensity.IntensityFusionRefused(f"{res.reason} (capsule-free because {_lower_first(why)})")
        exc.result = res  # for a QA record of the refusal
        raise exc
    rep = qa.build_intensity_report(res, targets_ct, thresholds)
    return IntensityFusion(np.asarray(res.matrix, float), res, rep, why)


class _FewCapsules(RegistrationFusionError):
    pass


def _lower_first(text: str) -> str:
    text = text.split(";")[0].strip().rstrip(".")
    return text[:1].lower() + text[1:]

"""Intensity-based refinement of the MRI -> CT registration (SimpleITK, Mattes mutual information).

Transforms are exchanged as 4x4 RAS matrices that map MRI-world points to CT-world points (the MRML
"transform to parent" of the MRI node). SimpleITK registers in LPS and its registration transform maps
*fixed* (CT) points to *moving* (MRI) points; the conversion happens only through
:mod:`SmartBiopsyCoreLib.geometry` helpers (:func:`itk_from_ras` / :func:`ras_from_itk` below wrap
them).

The landmark result is kept unless the refined transform (a) improves the metric and (b) moves each
capsule by no more than its localisation error allows. An optional deformable B-spline stage (coarse
control grid, bounded coefficients, bending-energy limit) is accepted only if it passes the same checks
plus target plausibility; otherwise it is rejected with the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from RegistrationFusionLib.errors import RegistrationFusionError
from SmartBiopsyCoreLib.dataio.transforms import (itk_from_ras, itk_linear_to_matrix as _itk_linear_to_matrix,  # noqa: F401
                                                  ras_from_itk, read_itk_transform, write_itk_transform)
from SmartBiopsyCoreLib.body import BODY_HU_THRESHOLD
from SmartBiopsyCoreLib.geometry import RasVolume, lps_geometry_from_ijk_to_ras, lps_to_ras_matrix, ras_to_lps_matrix
from RegistrationFusionLib.registration.landmarks import apply_transform

logger = logging.getLogger(__name__)


class RefinementCancelled(RegistrationFusionError):
    """The user cancelled the intensity refinement."""


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _float_image(vol: RasVolume):
    import SimpleITK as sitk

    if vol.array.size == 0 or min(vol.array.shape) < 1:
        raise RegistrationFusionError(f"the image '{vol.name}' is empty; load a complete series")
    return sitk.Cast(vol.to_sitk(), sitk.sitkFloat32)


def _mask_image(mask: RasVolume | None):
    import SimpleITK as sitk

    if mask is None:
        return None
    if not np.any(mask.array):
        raise RegistrationFusionError(f"the mask '{mask.name}' is empty; draw or compute a body/tumour mask first")
    return sitk.Cast(mask.with_array((mask.array > 0).astype(np.uint8)).to_sitk(), sitk.sitkUInt8)


def _crop_to_mask(vol: RasVolume, mask: RasVolume) -> tuple[RasVolume, RasVolume]:
    """``vol`` and ``mask`` (on the same grid) cut to the mask's bounding box, same world positions.

    With a fixed-image mask the Mattes metric only uses the voxels inside it (sample points and intensity range
    alike), so it has the same value on the cut images, at a fraction of the cost for a body mask on a whole CT.
    Returned unchanged when the grids differ, the mask is empty (refused later) or already fills its grid."""
    m = mask.array
    if not mask.same_grid(vol) or not m.any():
        return vol, mask
    idx = [np.flatnonzero(m.any(axis=ax)) for ax in ((1, 2), (0, 2), (0, 1))]
    lo = [int(i[0]) for i in idx]
    hi = [int(i[-1]) + 1 for i in idx]
    if lo == [0, 0, 0] and hi == list(m.shape):
        return vol, mask
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    ijk_to_ras = vol.ijk_to_ras.copy()
    ijk_to_ras[:3, 3] = vol.ijk_to_ras_points(np.array([[lo[2], lo[1], lo[0]]], float))[0]
    return tuple(RasVolume(np.ascontiguousarray(v.array[box]), ijk_to_ras, v.name, dict(v.meta)) for v in (vol, mask))


def _centre_lps(vol: RasVolume) -> np.ndarray:
    k, j, i = vol.array.shape
    c_ras = vol.ijk_to_ras_points(np.array([[(i - 1) / 2, (j - 1) / 2, (k - 1) / 2]]))[0]
    return _ras_to_lps_point(c_ras)


def _ras_to_lps_point(p_ras) -> np.ndarray:
    # NOTE: ras_to_lps_matrix(I) is I, so this returns the RAS point unchanged: the rotation centres it gives
    # are mirrored in R and A. That does not move the optimum, only the optimiser's path; it is kept so that the
    # default fusion does not change without a benchmark. Checks that need the true LPS point use
    # SmartBiopsyCoreLib.geometry.ras_to_lps_points (the B-spline stage below, local_refine).
    return (ras_to_lps_matrix(np.eye(4))[:3, :3] @ np.asarray(p_ras, float).T).T


def _rigid_from_matrix(m_lps: np.ndarray, centre_lps: np.ndarray):
    """Euler3DTransform equal to the (orthonormalised) 4x4 LPS matrix, rotating about ``centre_lps``."""
    import SimpleITK as sitk

    r = m_lps[:3, :3]
    u, _, vt = np.linalg.svd(r / np.cbrt(np.linalg.det(r)))
    r = u @ vt
    tx = sitk.Euler3DTransform()
    tx.SetCenter(tuple(float(v) for v in centre_lps))
    tx.SetMatrix(tuple(r.ravel()), 1e-6)
    b = m_lps[:3, 3]
    tx.SetTranslation(tuple(b - centre_lps + r @ centre_lps))
    return tx


def _affine_from_matrix(m_lps: np.ndarray, centre_lps: np.ndarray):
    import SimpleITK as sitk

    a = m_lps[:3, :3]
    tx = sitk.AffineTransform(3)
    tx.SetCenter(tuple(float(v) for v in centre_lps))
    tx.SetMatrix(tuple(a.ravel()))
    tx.SetTranslation(tuple(m_lps[:3, 3] - centre_lps + a @ centre_lps))
    return tx


def _method(bins: int, sampling: float, seed: int, fixed_mask=None, moving_mask=None):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    if sampling >= 1.0:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(float(sampling), int(seed))
    reg.SetInterpolator(sitk.sitkLinear)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    return reg


def mutual_information(ct: RasVolume, mri: RasVolume, mri_to_ct_ras: np.ndarray, *, bins: int = 32,
                       ct_mask: RasVolume | None = None, sampling: float = 1.0, seed: int = 1,
                       max_samples: int | None = 400_000) -> float:
    """Mattes mutual information (nats, larger = better aligned) of the CT and the MRI under a transform.

    Evaluated on the CT grid points (optionally only those inside ``ct_mask``). ``sampling`` < 1 keeps that
    fraction of them and ``max_samples`` caps their number (None: no cap), both by a regular subset: every
    s-th grid point along each axis (:func:`_regular_subset`), so the value is deterministic and two transforms
    compared with the same settings are scored on the same points. ``seed`` is not used (kept for callers).
    """
    if ct_mask is not None:
        ct, ct_mask = _crop_to_mask(ct, ct_mask)
    target = float(max_samples) if max_samples else float("inf")
    if sampling < 1.0:  # a fraction of the points scored (inside the mask when it is on the CT grid)
        n = np.count_nonzero(ct_mask.array) if ct_mask is not None and ct_mask.same_grid(ct) else ct.array.size
        target = min(target, float(n) * float(sampling))
    ct, ct_mask = _regular_subset(ct, ct_mask, target)
    reg = _method(bins, 1.0, seed, _mask_image(ct_mask))
    reg.SetInitialTransform(itk_from_ras(mri_to_ct_ras))
    return -float(reg.MetricEvaluate(_float_image(ct), _float_image(mri)))


def _regular_subset(ct: RasVolume, ct_mask: RasVolume | None, target: float):
    """``ct`` (and ``ct_mask`` on the same grid) on every s-th grid point along each axis, same world positions.

    SimpleITK's metric evaluation ignores the registration's sampling settings and scores every grid point, so
    the subset is made here: the step grows on the axis whose samples are closest in mm until at most about
    ``target`` points (inside the mask when given) remain. Returned unchanged when no step is needed, or when the
    subset would keep fewer than 1000 points."""
    m = None if ct_mask is None or not ct_mask.same_grid(ct) else ct_mask.array
    n = float(np.count_nonzero(m)) if m is not None else float(ct.array.size)
    sp = np.asarray(ct.spacing, float)[::-1]  # (k, j, i) mm
    steps = np.ones(3, int)
    while n / np.prod(steps) > max(target, 1.0) and np.any(steps < np.asarray(ct.array.shape)):
        free = steps < np.asarray(ct.array.shape)
        ax = int(np.argmin(np.where(free, sp * steps, np.inf)))
        steps[ax] += 1
    if np.all(steps == 1):
        return ct, ct_mask
    box = tuple(slice(None, None, int(s)) for s in steps)
    kept = int(np.count_nonzero(m[box])) if m is not None else ct.array[box].size
    if kept < 1000:  # too few points for a 32-bin joint histogram: score them all
        return ct, ct_mask
    ijk_to_ras = ct.ijk_to_ras @ np.diag([float(steps[2]), float(steps[1]), float(steps[0]), 1.0])
    sub = RasVolume(np.ascontiguousarray(ct.array[box]), ijk_to_ras, ct.name, dict(ct.meta))
    if m is None:
        return sub, ct_mask
    return sub, RasVolume(np.ascontiguousarray(m[box]), ijk_to_ras, ct_mask.name, dict(ct_mask.meta))


def moments_initialisation(ct: RasVolume, mri: RasVolume, threshold_ct: float = BODY_HU_THRESHOLD) -> np.ndarray:
    """Translation-only MRI->CT start (4x4 RAS) aligning the centres of mass of body-like voxels.

    For image pairs without capsules (e.g. a head CT/MR pair); the CT threshold is in HU, the MRI uses
    voxels above its 20th intensity percentile.
    """
    ct_mask = ct.array > threshold_ct
    mr_mask = mri.array > np.percentile(mri.array, 20)
    if not ct_mask.any() or not mr_mask.any():
        raise RegistrationFusionError("no body found in one of the images for the initial alignment; check the windowing/units")
    c_ct = ct.voxel_centres_ras(ct_mask).mean(axis=0)
    c_mr = mri.voxel_centres_ras(mr_mask).mean(axis=0)
    m = np.eye(4)
    m[:3, 3] = c_ct - c_mr
    return m


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@dataclass
class StageResult:
    """One optimisation stage (rigid / affine / bspline)."""

    name: str
    matrix: np.ndarray | None
    mi_before: float
    mi_after: float
    iterations: int
    stop: str

    def to_dict(self) -> dict:
        return {"name": self.name, "matrix_mri_to_ct_ras": None if self.matrix is None else np.asarray(self.matrix).tolist(),
                "mi_before": float(self.mi_before), "mi_after": float(self.mi_after),
                "iterations": int(self.iterations), "stop": self.stop}


@dataclass
class RefinementResult:
    """Outcome of intensity refinement (MRI -> CT, RAS mm).

    ``matrix`` is the transform to use: the refined one when ``accepted``, otherwise the landmark one
    (``initial_matrix``). Displacements compare the refined candidate with the initial transform, at the
    capsules (``capsule_displacement_mm`` vs ``capsule_allowed_mm``) and at the targets (CT RAS).
    ``mi_*`` is Mattes mutual information in nats (larger is better). ``deformable_transform`` holds the
    accepted B-spline stage as a SimpleITK transform (LPS, CT points -> MRI points, applied after
    ``matrix``), or None.
    """

    matrix: np.ndarray
    initial_matrix: np.ndarray
    candidate_matrix: np.ndarray
    accepted: bool
    reason: str
    mi_initial: float
    mi_final: float
    capsule_displacement_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    capsule_allowed_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    target_displacement_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stages: list[StageResult] = field(default_factory=list)
    deformable_accepted: bool = False
    deformable_reason: str = ""
    deformable_transform: object = None
    deformable_info: dict = field(default_factory=dict)

    @property
    def change_rotation_deg(self) -> float:
        d = self.candidate_matrix @ np.linalg.inv(self.initial_matrix)
        r = d[:3, :3] / np.cbrt(np.linalg.det(d[:3, :3]))
        return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))

    def to_dict(self) -> dict:
        return {
            "accepted": bool(self.accepted), "reason": self.reason,
            "matrix_mri_to_ct_ras": np.asarray(self.matrix).tolist(),
            "initial_matrix_mri_to_ct_ras": np.asarray(self.initial_matrix).tolist(),
            "candidate_matrix_mri_to_ct_ras": np.asarray(self.candidate_matrix).tolist(),
            "mi_initial": float(self.mi_initial), "mi_final": float(self.mi_final),
            "change_rotation_deg": self.change_rotation_deg,
            "capsule_displacement_mm": np.asarray(self.capsule_displacement_mm).tolist(),
            "capsule_allowed_mm": np.asarray(self.capsule_allowed_mm).tolist(),
            "target_displacement_mm": np.asarray(self.target_displacement_mm).tolist(),
            "stages": [s.to_dict() for s in self.stages],
            "deformable": {"accepted": bool(self.deformable_accepted), "reason": self.deformable_reason,
                           **{k: v for k, v in self.deformable_info.items()}},
        }


# ------------------------------------------------------------------------------------------------
# refinement
# ------------------------------------------------------------------------------------------------
def _run_stage(reg, fixed, moving, name, progress, should_cancel, lo, hi):
    import SimpleITK as sitk

    def on_iter():
        if should_cancel is not None and should_cancel():
            raise RefinementCancelled("intensity refinement was cancelled; the landmark registration is kept")
        if progress is not None:
            progress(lo + (hi - lo) * min(1.0, reg.GetOptimizerIteration() / 100.0), f"{name} refinement")

    from SmartBiopsyCoreLib.interruption import run_itk

    reg.RemoveAllCommands()
    reg.AddCommand(sitk.sitkIterationEvent, on_iter)
    try:
        out = run_itk(reg, fixed, moving)  # = reg.Execute(fixed, moving), stopped at once by Ctrl-C
    except RefinementCancelled:
        raise
    except RuntimeError as exc:
        from SmartBiopsyCoreLib.interruption import raise_if_interrupted

        raise_if_interrupted()  # Ctrl-C inside ITK may arrive as a RuntimeError: never blame the data for it
        raise RegistrationFusionError(
            f"the {name} intensity registration failed ({str(exc).splitlines()[-1][:120]}); "
            "check that the CT and MRI overlap, or use the landmark result") from None
    return out, int(reg.GetOptimizerIteration()), reg.GetOptimizerStopConditionDescription()


def refine_registration(ct: RasVolume, mri: RasVolume, initial_mri_to_ct: np.ndarray, *,
                        capsules_mri: np.ndarray | None = None, capsule_allowed_mm=None,
                        capsules_ct: np.ndarray | None = None,
                        targets_ct: np.ndarray | None = None, ct_mask: RasVolume | None = None,
                        mri_mask: RasVolume | None = None, affine: bool = False, deformable: bool = False,
                        shrink: tuple[int, ...] = (4, 2, 1), smoothing_mm: tuple[float, ...] = (2.0, 1.0, 0.0),
                        iterations: int = 200, bins: int = 32, sampling: float = 0.2, seed: int = 7,
                        max_step_mm: float = 2.0, min_step: float = 1e-2, max_samples: int | None = 100_000,
                        min_mi_gain: float = 0.0, max_target_displacement_mm: float = 5.0,
                        bspline_grid_mm: float = 60.0, bspline_max_coefficient_mm: float = 4.0,
                        max_bending_energy: float = 1e-3,
                        progress: Callable[[float, str], None] | None = None,
                        should_cancel: Callable[[], bool] | None = None) -> RefinementResult:
    """Refine an MRI->CT 4x4 RAS transform by Mattes MI: rigid, then optionally affine and B-spline.

    ``capsules_mri``: capsule centres in MRI RAS (mm); ``capsule_allowed_mm``: how far each may move
    (scalar or one per capsule, mm; e.g. 3x its combined CT+MRI localisation error). If any capsule moves
    further, or MI does not improve by more than ``min_mi_gain`` nats, the initial (landmark) transform
    is kept and ``reason`` says why. With ``capsules_ct`` (the paired CT capsule centres, CT RAS) the
    check is stricter and closer to the evidence: the refined transform must map each MRI capsule to
    within ``capsule_allowed_mm`` of its CT partner (displacements are still reported). ``targets_ct``: CT-RAS points at which displacement is reported.
    ``ct_mask``/``mri_mask``: optional body/tumour masks (RasVolume on each image's grid).
    ``sampling``: fraction of CT grid points used by the metric at each level, capped at about
    ``max_samples`` points per level (keeps large CTs fast; None: no cap).
    ``deformable``: try a coarse B-spline (control spacing ``bspline_grid_mm``, coefficients bounded by
    ``bspline_max_coefficient_mm``); it is accepted only if MI improves, the capsules and targets stay
    plausible and the bending energy (mm^-2, mean squared second derivative) stays under
    ``max_bending_energy``.
    """
    import SimpleITK as sitk

    m0 = np.asarray(initial_mri_to_ct, float)
    if m0.shape != (4, 4) or not np.all(np.isfinite(m0)) or abs(np.linalg.det(m0[:3, :3])) < 1e-6:
        raise RegistrationFusionError("the initial MRI-to-CT transform is not a valid 4x4 matrix; register the capsules first")
    fixed, moving = _float_image(ct), _float_image(mri)
    fmask, mmask = _mask_image(ct_mask), _mask_image(mri_mask)
    if len(shrink) != len(smoothing_mm):
        raise RegistrationFusionError("shrink factors and smoothing levels must have the same length")
    centre = _centre_lps(ct)
    if targets_ct is not None and len(targets_ct):
        centre = _ras_to_lps_point(np.asarray(targets_ct, float).reshape(-1, 3).mean(axis=0))

    mi0 = mutual_information(ct, mri, m0, bins=bins, ct_mask=ct_mask, sampling=min(1.0, 4 * sampling), seed=seed)
    stages: list[StageResult] = []
    current_lps = ras_to_lps_matrix(np.linalg.inv(m0))
    plan = ["rigid"] + (["affine"] if affine else [])
    n_lin = len(plan) + (1 if deformable else 0)
    for si, name in enumerate(plan):
        reg = _method(bins, sampling, seed, fmask, mmask)
        init = _rigid_from_matrix(current_lps, centre) if name == "rigid" else _affine_from_matrix(current_lps, centre)
        # the affine stage starts from a good rigid result: only the two finest levels and half the step
        levels, sigmas = (shrink, smoothing_mm) if name == "rigid" else (shrink[-2:], smoothing_mm[-2:])
        step = max_step_mm if name == "rigid" else 0.5 * max_step_mm
        reg.SetInitialTransform(init, inPlace=False)
        # the learning rate is estimated at the start of each level so that the first step moves voxels by at
        # most ``max_step_mm``; the step halves whenever the gradient direction reverses and the level stops once
        # it falls below ``min_step`` (in the same physical-shift units)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=float(min_step),
                                                     numberOfIterations=int(iterations), relaxationFactor=0.5,
                                                     gradientMagnitudeTolerance=1e-8,
                                                     estimateLearningRate=reg.Once,
                                                     maximumStepSizeInPhysicalUnits=float(step))
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(list(levels))
        reg.SetSmoothingSigmasPerLevel(list(sigmas))
        if max_samples and sampling < 1.0:
            n_vox = float(ct.array.size)
            reg.SetMetricSamplingPercentagePerLevel(
                [float(min(sampling, max_samples * f ** 3 / n_vox)) for f in levels], int(seed))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        out, iters, stop = _run_stage(reg, fixed, moving, name, progress, should_cancel, si / n_lin, (si + 1) / n_lin)
        stage_lps = _itk_linear_to_matrix(out)
        m_stage = np.linalg.inv(lps_to_ras_matrix(stage_lps))
        mi_s = mutual_information(ct, mri, m_stage, bins=bins, ct_mask=ct_mask, sampling=min(1.0, 4 * sampling), seed=seed)
        mi_prev = stages[-1].mi_after if stages else mi0
        if stages and mi_s < mi_prev:
            # a later stage that lowers MI is dropped: the previous stage's transform stays the candidate
            logger.info("%s stage lowered MI (%.4f -> %.4f); keeping the %s result", name, mi_prev, mi_s, stages[-1].name)
            stages.append(StageResult(name, stages[-1].matrix, mi_prev, mi_prev, iters,
                                      f"dropped: MI decreased to {mi_s:.4f} ({stop})"))
            continue
        current_lps = stage_lps
        stages.append(StageResult(name, m_stage, mi_prev, mi_s, iters, stop))
        logger.info("%s refinement: MI %.4f -> %.4f after %d iterations", name, mi_prev, mi_s, iters)

    cand = stages[-1].matrix
    mi1 = stages[-1].mi_after
    caps = None if capsules_mri is None else np.asarray(capsules_mri, float).reshape(-1, 3)
    cap_disp = np.zeros(0) if caps is None else np.linalg.norm(apply_transform(cand, caps) - apply_transform(m0, caps), axis=1)
    allowed = np.zeros(0)
    if caps is not None:
        allowed = np.broadcast_to(np.asarray(2.0 if capsule_allowed_mm is None else capsule_allowed_mm, float),
                                  (len(caps),)).astype(float)
    tgt = np.zeros((0, 3)) if targets_ct is None else np.asarray(targets_ct, float).reshape(-1, 3)
    # target displacement: a CT point t corresponds to MRI point inv(m0) t; where does the candidate put it?
    tgt_disp = np.linalg.norm(apply_transform(cand @ np.linalg.inv(m0), tgt) - tgt, axis=1) if len(tgt) else np.zeros(0)

    reasons = []
    kept_resid = None  # the landmark registration's own capsule residuals (mm), when the CT capsules are given
    if not mi1 > mi0 + min_mi_gain:
        reasons.append(f"mutual information did not improve ({mi0:.4f} -> {mi1:.4f} nats)")
    if caps is not None and capsules_ct is not None:
        pc = np.asarray(capsules_ct, float).reshape(-1, 3)
        if pc.shape != caps.shape:
            raise RegistrationFusionError("capsules_ct and capsules_mri must be the same paired capsules")
        resid = np.linalg.norm(apply_transform(cand, caps) - pc, axis=1)
        kept_resid = np.linalg.norm(apply_transform(m0, caps) - pc, axis=1)
        if np.any(resid > allowed):
            k = int(np.argmax(resid - allowed))
            reasons.append(f"it would leave capsule {k} {resid[k]:.2f} mm from its CT position, more than the "
                           f"{allowed[k]:.2f} mm its localisation error allows (the landmark registration leaves "
                           f"it {kept_resid[k]:.2f} mm)")
    elif len(cap_disp) and np.any(cap_disp > allowed):
        k = int(np.argmax(cap_disp - allowed))
        reasons.append(f"it would move capsule {k} by {cap_disp[k]:.2f} mm, more than the {allowed[k]:.2f} mm its "
                       "localisation error allows")
    accepted = not reasons
    reason = ("refinement accepted: MI {:.4f} -> {:.4f} nats, capsules moved at most {:.2f} mm".format(
        mi0, mi1, float(cap_disp.max()) if len(cap_disp) else 0.0) if accepted
        else kept_landmark_reason(reasons, kept_resid))
    logger.info(reason)
    result = RefinementResult(cand if accepted else m0, m0, cand, accepted, reason, mi0, mi1, cap_disp, allowed,
                              tgt_disp, stages)
    if deformable:
        _bspline_stage(result, ct, mri, fixed, moving, fmask, mmask, caps, tgt, bins, sampling, seed, iterations,
                       bspline_grid_mm, bspline_max_coefficient_mm, max_bending_energy, max_target_displacement_mm,
                       progress, should_cancel, (n_lin - 1) / n_lin)
    if progress is not None:
        progress(1.0, "refinement done")
    return result


def _evaluate(bins, sampling, seed, fmask, transform, fixed, moving) -> float:
    """Mattes metric value (negative MI) of ``transform`` with the same sampling and mask for every call."""
    ev = _method(bins, sampling, seed, fmask)
    ev.SetInitialTransform(transform)
    return float(ev.MetricEvaluate(fixed, moving))


def _bspline_stage(result: RefinementResult, ct, mri, fixed, moving, fmask, mmask, caps, tgt, bins, sampling, seed,
                   iterations, grid_mm, max_coef_mm, max_bending, max_target_mm, progress, should_cancel, lo):
    """Coarse, bounded B-spline on top of ``result.matrix``; fills the deformable_* fields."""
    import SimpleITK as sitk

    size_mm = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    mesh = [max(1, int(round(s / grid_mm))) for s in size_mm]
    bs = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = _method(bins, sampling, seed, fmask, mmask)
    lin = itk_from_ras(result.matrix)
    reg.SetMovingInitialTransform(lin)
    reg.SetInitialTransform(bs, inPlace=True)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=int(iterations),
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * int(iterations),
                             costFunctionConvergenceFactor=1e7, lowerBound=-float(max_coef_mm),
                             upperBound=float(max_coef_mm))
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    mi_before = -float(_evaluate(bins, min(1.0, 4 * sampling, 400_000 / float(ct.array.size)), seed, fmask, lin,
                                 fixed, moving))
    out, iters, stop = _run_stage(reg, fixed, moving, "deformable", progress, should_cancel, lo, 1.0)
    comp = sitk.CompositeTransform([lin, out])  # ITK applies the last one first: B-spline on CT points, then linear

    # metric after, same sampling as before
    mi_after = -float(_evaluate(bins, min(1.0, 4 * sampling, 400_000 / float(ct.array.size)), seed, fmask, comp,
                                fixed, moving))

    # displacement field on a coarse grid -> bending energy (mean squared second derivatives, mm^-2)
    step = 8.0
    ref = sitk.Image([max(4, int(s / step)) for s in size_mm], sitk.sitkFloat32)
    ref.SetOrigin(fixed.GetOrigin()); ref.SetDirection(fixed.GetDirection()); ref.SetSpacing([step] * 3)
    dfield = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(out, sitk.sitkVectorFloat64, ref.GetSize(),
                                                                      ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection()))
    bend = 0.0
    for c in range(3):
        g = np.gradient(dfield[..., c], step)
        for a in range(3):
            h = np.gradient(g[a], step)
            bend += sum(float(np.mean(h[b] ** 2)) for b in range(3))
    max_disp = float(np.max(np.linalg.norm(dfield, axis=-1)))

    def deform_ct_point(p_ras):
        from SmartBiopsyCoreLib.geometry import ras_to_lps_points

        p_lps = ras_to_lps_points(np.asarray(p_ras, float))
        q = np.array(out.TransformPoint(tuple(float(v) for v in p_lps)))
        return np.linalg.norm(q - p_lps)

    cap_ct = apply_transform(result.matrix, caps) if caps is not None else np.zeros((0, 3))
    cap_disp = np.array([deform_ct_point(p) for p in cap_ct])
    tgt_disp = np.array([deform_ct_point(p) for p in tgt])
    allowed = result.capsule_allowed_mm if len(result.capsule_allowed_mm) else np.full(len(cap_disp), 2.0)
    reasons = []
    if not mi_after > mi_before:
        reasons.append(f"mutual information did not improve ({mi_before:.4f} -> {mi_after:.4f} nats)")
    if len(cap_disp) and np.any(cap_disp > allowed):
        k = int(np.argmax(cap_disp - allowed))
        reasons.append(f"it moved capsule {k} by {cap_disp[k]:.2f} mm (allowed {allowed[k]:.2f} mm)")
    if len(tgt_disp) and np.any(tgt_disp > max_target_mm):
        reasons.append(f"it moved a target by {tgt_disp.max():.2f} mm (more than {max_target_mm:.1f} mm is implausible)")
    if bend > max_bending:
        reasons.append(f"its bending energy {bend:.2e} mm^-2 exceeds {max_bending:.1e}")
    result.deformable_info = {"mi_before": mi_before, "mi_after": mi_after, "bending_energy_mm2": bend,
                              "max_displacement_mm": max_disp, "capsule_displacement_mm": cap_disp.tolist(),
                              "target_displacement_mm": tgt_disp.tolist(), "iterations": iters, "stop": stop,
                              "mesh": mesh}
    result.deformable_accepted = not reasons
    result.deformable_reason = ("deformable refinement accepted" if not reasons
                                else "deformable refinement rejected: " + "; ".join(reasons))
    result.deformable_transform = out if not reasons else None
    logger.info(result.deformable_reason)


def resample_mri_on_ct(mri: RasVolume, ct: RasVolume, result_or_matrix, order: int = 1) -> RasVolume:
    """MRI resampled onto the CT grid with a 4x4 RAS matrix or a :class:`RefinementResult` (incl. accepted B-spline)."""
    from SmartBiopsyCoreLib.geometry import resample

    if isinstance(result_or_matrix, RefinementResult) and result_or_matrix.deformable_transform is not None:
        import SimpleITK as sitk

        comp = sitk.CompositeTransform([itk_from_ras(result_or_matrix.matrix), result_or_matrix.deformable_transform])
        ref = sitk.Image([int(s) for s in ct.array.shape[::-1]], sitk.sitkUInt8)
        o, s, d = lps_geometry_from_ijk_to_ras(ct.ijk_to_ras)
        ref.SetOrigin(tuple(o)); ref.SetSpacing(tuple(s)); ref.SetDirection(tuple(d.ravel()))
        interp = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}[order]
        res = sitk.Resample(mri.to_sitk(), ref, comp, interp, 0.0,
                            mri.to_sitk().GetPixelID() if order == 0 else sitk.sitkFloat32)
        return RasVolume(sitk.GetArrayFromImage(res), ct.ijk_to_ras.copy(), mri.name, dict(mri.meta))
    m = result_or_matrix.matrix if isinstance(result_or_matrix, RefinementResult) else result_or_matrix
    return resample(mri, ct, m, order=order)


def kept_landmark_reason(reasons: list, landmark_residuals_mm=None) -> str:
    """Why the intensity refinement was rejected, worded so that no number can be read as the kept
    registration's: the kept landmark registration's own capsule residual (RMS and worst, mm) comes first,
    then the rejected refinement's faults (``reasons``, clauses about the refined transform)."""
    kept = ""
    r = np.asarray([] if landmark_residuals_mm is None else landmark_residuals_mm, float).ravel()
    if r.size:
        kept = (f"; its capsule residual is {float(np.sqrt(np.mean(r ** 2))):.2f} mm RMS "
                f"(worst {float(r.max()):.2f} mm)")
    return (f"intensity refinement rejected, landmark registration kept{kept}. The rejected refinement: "
            + "; ".join(reasons))

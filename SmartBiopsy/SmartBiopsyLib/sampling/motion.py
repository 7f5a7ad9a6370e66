"""Patient motion between the planning CT and a confirmation CT, found on the skin capsules.

The capsules stay on the skin for the whole procedure and show in every CT. :func:`check_patient_motion`
finds them in the confirmation CT, pairs them with the planning CT's capsules without relying on their
order (``RegistrationFusionLib.registration.landmarks.register_capsules``) and measures how far each one
moved. When any moved more than ``tolerance_mm`` (default 2 mm) the rigid capsule registration
(confirmation -> planning) is the correction; optionally refined by intensity in a box around the target
(metal masked), which also follows a breathing displacement of the tumour that the skin does not show.
:func:`to_planning_frame` resamples the confirmation CT into the planning frame around the planned path so
that needle detection and notch sampling work in the frame of the plan and the maps.

Frames: planning frame = the planning CT's RAS world; confirmation frame = the confirmation CT's RAS world;
``confirmation_to_planning`` maps confirmation-frame points to planning-frame points (4x4, RAS mm).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from SmartBiopsyCoreLib.errors import SmartBiopsyError
from SmartBiopsyCoreLib.geometry import RasVolume

logger = logging.getLogger(__name__)

#: Default motion tolerance (mm): capsules (or the tissue around the target) that moved more than this
#: trigger the correction.
DEFAULT_TOLERANCE_MM = 2.0
#: A local intensity refinement that moves the target farther than this (mm) is not trusted.
MAX_LOCAL_REFINEMENT_MM = 10.0


@dataclass
class MotionCheck:
    """Result of the patient-motion check of one confirmation CT (RAS mm)."""

    checked: bool
    tolerance_mm: float
    motion_mm: float | None = None              #: largest capsule displacement between the two CTs
    mean_motion_mm: float | None = None
    motion_at_target_mm: float | None = None    #: displacement of the planned target implied by the correction
    moved: bool = False
    corrected: bool = False
    method: str = "none"                         #: "none", "capsules" or "capsules + local intensity"
    confirmation_to_planning: np.ndarray = field(default_factory=lambda: np.eye(4))
    capsules_planning: int = 0
    capsules_confirmation: int = 0
    pairs: int = 0
    displacements_mm: list = field(default_factory=list)
    fre_mm: float | None = None
    local_refinement_mm: float | None = None    #: extra shift found by the local intensity refinement
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        if not self.checked:
            return "not checked"
        text = f"capsules {self.motion_mm:.1f} mm"
        if self.local_refinement_mm is not None:
            text += f", tissue at the target {self.local_refinement_mm:.1f} mm more"
        if not self.moved:
            return f"{text} (within {self.tolerance_mm:g} mm)"
        return f"{text}, " + (f"corrected ({self.method})" if self.corrected else "NOT corrected")

    def to_dict(self) -> dict:
        r = lambda v: None if v is None else round(float(v), 3)  # noqa: E731
        return {"checked": self.checked, "tolerance_mm": float(self.tolerance_mm), "motion_mm": r(self.motion_mm),
                "mean_motion_mm": r(self.mean_motion_mm), "motion_at_target_mm": r(self.motion_at_target_mm),
                "moved": bool(self.moved), "corrected": bool(self.corrected), "method": self.method,
                "confirmation_to_planning_ras": np.asarray(self.confirmation_to_planning, float).round(6).tolist(),
                "capsules_planning": int(self.capsules_planning),
                "capsules_confirmation": int(self.capsules_confirmation), "pairs": int(self.pairs),
                "displacements_mm": [round(float(v), 3) for v in self.displacements_mm], "fre_mm": r(self.fre_mm),
                "local_refinement_mm": r(self.local_refinement_mm), "summary": self.summary(),
                "warnings": list(self.warnings), "notes": list(self.notes),
                "frame": "confirmation_to_planning maps confirmation-CT RAS points to planning-CT RAS points"}


def _centres(capsules) -> np.ndarray:
    return np.asarray(getattr(capsules, "centres_ras", capsules), float).reshape(-1, 3)


def check_patient_motion(planning_capsules, confirmation_ct: RasVolume, *, tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                         correct: bool = True, target_ras=None, planning_ct: RasVolume | None = None,
                         local_box_mm: float = 60.0, confirmation_capsules=None) -> MotionCheck:
    """Compare the skin capsules of ``confirmation_ct`` with ``planning_capsules`` (a capsule detection or an
    (N, 3) RAS array of the planning CT) and, when they moved more than ``tolerance_mm`` and ``correct`` is
    true, return the confirmation -> planning correction (rigid capsule registration).

    With ``planning_ct`` and ``target_ras`` (planning frame) a translation-only intensity registration in a
    ``local_box_mm`` cube around the target (needle metal masked) follows the capsule result (or identity when
    the skin did not move); its extra displacement of the target is kept when at most
    :data:`MAX_LOCAL_REFINEMENT_MM`, and counts as motion too (breathing moves the tumour, not the skin).
    Never raises for missing or unmatched capsules: the result then says ``checked=False`` with a warning.
    """
    from RegistrationFusionLib.capsules.detection import detect_capsules
    from RegistrationFusionLib.registration.landmarks import apply_transform, register_capsules

    tol = float(tolerance_mm)
    if not np.isfinite(tol) or tol <= 0:
        raise SmartBiopsyError(f"the patient-motion tolerance must be a positive number of mm, not {tolerance_mm}")
    res = MotionCheck(checked=False, tolerance_mm=tol)
    fixed = _centres(planning_capsules)
    res.capsules_planning = len(fixed)
    try:
        det = confirmation_capsules if confirmation_capsules is not None else detect_capsules(confirmation_ct, "ct")
        moving = _centres(det)
    except SmartBiopsyError as exc:
        moving = np.zeros((0, 3))
        logger.info("no capsules in the confirmation CT: %s", exc)
    res.capsules_confirmation = len(moving)
    if len(fixed) < 3 or len(moving) < 3:
        res.warnings.append(f"patient motion was not checked: {len(moving)} skin capsules found in the confirmation "
                            f"CT and {len(fixed)} in the planning CT (3 needed in each); the needle position "
                            "assumes the patient did not move")
        return res
    try:
        corr, reg = register_capsules(fixed, moving, fle_ct=0.3, fle_mri=0.3,
                                      match_options={"max_unmatched": max(len(fixed), len(moving)) - 3,
                                                     "gate_mm": 4.0})
    except SmartBiopsyError as exc:
        res.warnings.append(f"patient motion was not checked: the skin capsules of the confirmation CT could not be "
                            f"paired with those of the planning CT ({exc}); the needle position assumes the patient "
                            "did not move")
        return res
    fi, mi = corr.fixed_indices, corr.moving_indices
    disp = np.linalg.norm(moving[mi] - fixed[fi], axis=1)
    res.checked = True
    res.pairs = len(fi)
    res.displacements_mm = disp.tolist()
    res.motion_mm = float(disp.max())
    res.mean_motion_mm = float(disp.mean())
    res.fre_mm = float(reg.fre_mm)
    m = np.asarray(reg.matrix, float)               # confirmation -> planning (moving -> fixed)
    if target_ras is not None:
        t = np.asarray(target_ras, float).reshape(3)
        res.motion_at_target_mm = float(np.linalg.norm(apply_transform(np.linalg.inv(m), t) - t))
    capsules_moved = res.motion_mm > tol
    start = m if capsules_moved else np.eye(4)
    refined, extra = None, None
    if planning_ct is not None and target_ras is not None:
        try:
            refined, extra = _refine_near_target(planning_ct, confirmation_ct, start, np.asarray(target_ras, float),
                                                 local_box_mm)
        except Exception as exc:  # noqa: BLE001 - the capsule check stands on its own
            logger.warning("local intensity refinement failed (%s); using the skin capsules only", exc)
        if extra is not None and extra > MAX_LOCAL_REFINEMENT_MM:
            res.notes.append(f"local intensity refinement rejected: it moved the target {extra:.1f} mm "
                             f"(more than {MAX_LOCAL_REFINEMENT_MM:g} mm)")
            refined, extra = None, None
        res.local_refinement_mm = extra
    internal_moved = extra is not None and extra > tol
    res.moved = capsules_moved or internal_moved
    if not res.moved:
        res.notes.append(f"skin capsules moved at most {res.motion_mm:.1f} mm"
                         + ("" if extra is None else f", the tissue around the target {extra:.1f} mm")
                         + f" (tolerance {tol:g} mm); no correction")
        return res
    parts = []
    if capsules_moved:
        parts.append(f"the patient moved {res.motion_mm:.1f} mm between the planning CT and this confirmation CT "
                     f"(largest skin-capsule displacement, {res.pairs} capsules)")
    if internal_moved:
        parts.append(f"the tissue around the target moved {extra:.1f} mm "
                     + ("beyond the skin motion" if capsules_moved else "while the skin did not")
                     + " (breathing or organ motion)")
    what = "; ".join(parts)
    final = refined if refined is not None else m
    res.motion_at_target_mm = float(np.linalg.norm(apply_transform(np.linalg.inv(final), target_ras) - target_ras)) \
        if target_ras is not None else res.motion_at_target_mm
    if not correct:
        res.warnings.append(f"{what}; NOT corrected: needle position and notch values may be off by about that much")
        return res
    res.confirmation_to_planning = final
    res.corrected = True
    if capsules_moved:
        res.method = "capsules + local intensity" if refined is not None else "capsules"
    else:
        res.method = "local intensity"
    res.notes.append(f"{what}; corrected by {res.method} (capsule FRE {res.fre_mm:.2f} mm)")
    logger.warning("%s; corrected by %s", what, res.method)
    return res


def _box_grid(reference: RasVolume, points_ras, margin_mm: float) -> RasVolume:
    """An empty float32 grid on ``reference``'s lattice covering ``points_ras`` grown by ``margin_mm``."""
    ijk = reference.ras_to_ijk_points(np.asarray(points_ras, float).reshape(-1, 3))
    pad = margin_mm / reference.spacing
    lo = np.maximum(np.floor(ijk.min(axis=0) - pad).astype(int), 0)
    hi = np.minimum(np.ceil(ijk.max(axis=0) + pad).astype(int) + 1, np.array(reference.array.shape[::-1]))
    if np.any(hi <= lo):
        raise SmartBiopsyError("the planned path lies outside the planning CT; check the plan")
    m = reference.ijk_to_ras.copy()
    m[:3, 3] = reference.ijk_to_ras_points(lo.astype(float))[0]
    shape = tuple(int(v) for v in (hi - lo)[::-1])
    return RasVolume(np.zeros(shape, np.float32), m, reference.name, dict(reference.meta))


def to_planning_frame(confirmation_ct: RasVolume, motion: MotionCheck, reference: RasVolume, points_ras,
                      margin_mm: float = 45.0) -> RasVolume:
    """The confirmation CT resampled (linear) into the planning frame on ``reference``'s lattice, in a box around
    the planning-frame ``points_ras`` (e.g. planned entry and target) grown by ``margin_mm``. HU, float32;
    outside the confirmation CT is -1024. The caller owns the returned volume."""
    from SmartBiopsyCoreLib.geometry import resample

    box = _box_grid(reference, points_ras, margin_mm)
    out = resample(confirmation_ct, box, np.asarray(motion.confirmation_to_planning, float), order=1, fill=-1024.0)
    out.name = f"{confirmation_ct.name} in the planning frame"
    out.meta["motion_corrected"] = bool(motion.corrected)
    return out


def _refine_near_target(planning_ct: RasVolume, confirmation_ct: RasVolume, init: np.ndarray, target: np.ndarray,
                        box_mm: float):
    """Translation-only intensity registration of the confirmation CT to the planning CT in a cube around
    ``target`` (planning frame), starting from ``init`` (confirmation -> planning). Intensities are clipped to
    soft tissue (-200..300 HU); the needle (metal above 1500 HU grown by 4 mm) is masked out.

    Returns (refined 4x4 confirmation -> planning, how far the refinement moves the target in mm).
    """
    import SimpleITK as sitk
    from scipy import ndimage

    from RegistrationFusionLib.registration.landmarks import apply_transform
    from SmartBiopsyCoreLib.geometry import lps_to_ras_matrix, resample

    fixed_box = _box_grid(planning_ct, target, 0.5 * box_mm)
    fixed_vol = resample(planning_ct, fixed_box, None, order=1, fill=-1024.0)
    fixed = fixed_vol.with_array(np.clip(fixed_vol.array.astype(np.float32), -200, 300)).to_sitk()
    # the moving image in the planning box too (through the capsule correction), so the metal mask is small
    moving_vol = resample(confirmation_ct, _box_grid(planning_ct, target, 0.5 * box_mm + 15.0), init, order=1,
                          fill=-1024.0)
    metal = moving_vol.array > 1500
    grow = np.maximum(np.round(4.0 / moving_vol.spacing[::-1]).astype(int), 1)
    metal = ndimage.binary_dilation(metal, structure=np.ones(2 * grow + 1, bool))
    mask = moving_vol.with_array(((~metal) & (moving_vol.array > -500)).astype(np.uint8))
    mov = moving_vol.with_array(np.clip(moving_vol.array.astype(np.float32), -200, 300)).to_sitk()
    tx = sitk.TranslationTransform(3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetMetricMovingMask(mask.to_sitk())
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.01, numberOfIterations=100,
                                                 relaxationFactor=0.6)
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.5, 0.7])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(tx, inPlace=True)
    from SmartBiopsyCoreLib.interruption import run_itk

    run_itk(reg, fixed, mov)  # = reg.Execute(fixed, mov), stopped at once by Ctrl-C
    a = np.eye(4)
    a[:3, 3] = np.asarray(tx.GetOffset())          # planning -> corrected-confirmation points, LPS
    local = np.linalg.inv(lps_to_ras_matrix(a))    # corrected-confirmation -> planning, RAS
    refined = local @ np.asarray(init, float)
    extra = float(np.linalg.norm(apply_transform(local, target) - target))
    return refined, extra

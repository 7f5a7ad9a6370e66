"""Capsule-free MRI -> CT fusion: several rigid mutual-information registrations from pose hypotheses.

Used when the scans carry fewer than three capsule pairs (or on request). The starting orientations come
from the DICOM Patient Position of both series (head/feet first, supine/prone: ``meta["patient_position"]``
of the :class:`~SmartBiopsyCoreLib.geometry.RasVolume`, read by ``dicomio``) and, as the alternative, the
DICOM patient frame itself; for NRRD/NIfTI (no position) from the principal axes of the two body outlines
(every sign, and swapped axes where two axes are about equally long) and the image axes. Each hypothesis
is started a few times (the hypothesis and small rotations about it), every start is refined by Mattes
mutual information (SimpleITK, rigid), and the results are compared with one metric evaluation.

A result is accepted only when it is unambiguous:

* the best start gained mutual information over its initial pose (``min_mi_gain`` nats),
* at least ``min_agreeing`` starts converged to it (RMS distance over the CT body inside the MRI field of
  view within ``agreement_mm``),
* the best *distinct* solution (further than ``agreement_mm``) is clearly worse: its MI is lower by at
  least ``min_margin`` of the best MI.

Otherwise it is refused with one sentence. The error estimate of an accepted fusion is the spread of the
agreeing starts plus a stated floor (``error_floor_mm``): the agreement shows the optimum is reproducible,
not that it is exact, and intensity-only rigid CT/MR fusion is not better than a millimetre or two.
No capsule FRE/TRE is involved. Transforms are 4x4 RAS matrices mapping MRI points to CT points (mm).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from RegistrationFusionLib.errors import RegistrationFusionError
from SmartBiopsyCoreLib.geometry import RasVolume, ras_to_lps_matrix

logger = logging.getLogger(__name__)

#: patient axes -> table (world) axes for each DICOM Patient Position, RAS (rotations by 180 degrees)
POSITION_RAS = {
    "HFS": np.diag([1.0, 1.0, 1.0]),
    "FFS": np.diag([-1.0, 1.0, -1.0]),   # turned about A: left-right and head-feet swap
    "HFP": np.diag([-1.0, -1.0, 1.0]),   # turned about S: left-right and front-back swap
    "FFP": np.diag([1.0, -1.0, -1.0]),   # both
}


class IntensityFusionRefused(RegistrationFusionError):
    """The capsule-free fusion found no unambiguous alignment (the message says why and what to do)."""


@dataclass
class IntensityStart:
    """One start: its hypothesis, the initial and refined MRI->CT matrices (RAS) and MI (nats, higher better)."""

    hypothesis: str
    initial: np.ndarray
    refined: np.ndarray
    mi_initial: float
    mi_final: float
    iterations: int = 0
    distance_to_best_mm: float = float("nan")

    def to_dict(self) -> dict:
        return {"hypothesis": self.hypothesis, "mi_initial": round(float(self.mi_initial), 5),
                "mi_final": round(float(self.mi_final), 5), "iterations": int(self.iterations),
                "distance_to_best_mm": None if not np.isfinite(self.distance_to_best_mm)
                else round(float(self.distance_to_best_mm), 3),
                "initial_matrix_mri_to_ct_ras": np.asarray(self.initial).tolist(),
                "matrix_mri_to_ct_ras": np.asarray(self.refined).tolist()}


@dataclass
class IntensityFusionResult:
    """Outcome of :func:`register_intensity` (RAS mm; ``matrix`` maps MRI points to CT points).

    ``accepted`` False: ``matrix`` is the best candidate for inspection only and must not be used;
    ``reason`` is the sentence for the user. ``error_estimate_mm`` = ``spread_mm`` + ``error_floor_mm``.
    """

    matrix: np.ndarray
    accepted: bool
    reason: str
    prior: str
    starts: list[IntensityStart]
    n_agreeing: int
    spread_mm: float
    error_floor_mm: float
    error_estimate_mm: float
    mi_gain: float
    margin: float
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    method: str = "intensity"

    def to_dict(self) -> dict:
        return {"method": "intensity-only (mutual information, no capsules)", "accepted": bool(self.accepted),
                "reason": self.reason, "prior": self.prior, "matrix_mri_to_ct_ras": np.asarray(self.matrix).tolist(),
                "n_agreeing_starts": int(self.n_agreeing), "spread_mm": _f(self.spread_mm),
                "error_floor_mm": _f(self.error_floor_mm), "error_estimate_mm": _f(self.error_estimate_mm),
                "mi_gain_nats": _f(self.mi_gain), "margin_fraction": _f(self.margin), "seconds": round(self.seconds, 2),
                "settings": dict(self.settings), "starts": [s.to_dict() for s in self.starts],
                "units": {"distances": "mm", "mi": "nats", "transform": "4x4 RAS, maps MRI points to CT points"}}

    def require_accepted(self) -> "IntensityFusionResult":
        """Return self when accepted, else raise :class:`IntensityFusionRefused` with the reason."""
        if not self.accepted:
            raise IntensityFusionRefused(self.reason)
        return self


def _f(v):
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def _rot(axis: int, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def rotation_angle_deg(r: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(r[:3, :3]) - 1) / 2, -1, 1))))


# ------------------------------------------------------------------------------------------------
# images on a coarse working grid
# ------------------------------------------------------------------------------------------------
def _working_image(vol: RasVolume, grid_mm: float, clip: tuple[float, float] | None):
    """SimpleITK float image block-averaged to about ``grid_mm`` (no full-resolution filtering)."""
    import SimpleITK as sitk

    if vol.array.size == 0 or min(vol.array.shape) < 2:
        raise RegistrationFusionError(f"the image '{vol.name}' is empty or has a single slice; load the full series")
    img = sitk.Cast(vol.to_sitk(), sitk.sitkFloat32)
    f = [max(1, int(round(grid_mm / s))) for s in img.GetSpacing()]
    if any(v > 1 for v in f):
        img = sitk.BinShrink(img, f)
    if clip is not None:
        img = sitk.Clamp(img, sitk.sitkFloat32, float(clip[0]), float(clip[1]))
    return img


def _body_mask(img, modality: str):
    """uint8 body mask of a working image: CT above -400 HU, MRI above half its Otsu threshold."""
    import SimpleITK as sitk

    a = sitk.GetArrayViewFromImage(img)
    if modality == "ct":
        m = a > -400.0
    else:
        v = a[np.isfinite(a)]
        thr = _otsu(v)
        m = a > 0.5 * thr
    if m.sum() < 50:
        raise RegistrationFusionError(f"no body found in the {'CT' if modality == 'ct' else 'MRI'} for the "
                                      "capsule-free fusion; check the image and its intensities")
    out = sitk.GetImageFromArray(m.astype(np.uint8))
    out.CopyInformation(img)
    return out, m


def _otsu(v: np.ndarray, bins: int = 128) -> float:
    h, e = np.histogram(v, bins=bins)
    c = 0.5 * (e[1:] + e[:-1])
    w0 = np.cumsum(h)
    w1 = w0[-1] - w0
    m0 = np.cumsum(h * c)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return float(c[int(np.argmax((w0 * w1 * (mu0 - mu1) ** 2)[:-1]))])


def _mask_points_ras(img, mask_arr: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """RAS coordinates (mm) of up to ``max_points`` mask voxels of a SimpleITK image."""
    idx = np.argwhere(mask_arr)[:, ::-1].astype(float)  # i, j, k
    if len(idx) > max_points:
        idx = idx[np.random.default_rng(seed).choice(len(idx), max_points, replace=False)]
    d = np.array(img.GetDirection()).reshape(3, 3)
    lps = (d @ (idx * np.array(img.GetSpacing())).T).T + np.array(img.GetOrigin())
    return lps * np.array([-1.0, -1.0, 1.0])


def _moments(pts: np.ndarray):
    c = pts.mean(axis=0)
    w, v = np.linalg.eigh(np.cov((pts - c).T))
    order = np.argsort(w)[::-1]
    return c, w[order], v[:, order]


# ------------------------------------------------------------------------------------------------
# hypotheses
# ------------------------------------------------------------------------------------------------
def pose_hypotheses(ct_meta: dict, mri_meta: dict, ct_pts: np.ndarray, mri_pts: np.ndarray,
                    equal_axes_ratio: float = 1.25) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """(prior description, [(name, 3x3 MRI->CT rotation)]) to start from.

    With a known DICOM Patient Position in both images: the rotation between the two positions and the
    DICOM patient frame as it is (they coincide when both positions are equal). Otherwise the principal
    axes of the two bodies (four sign choices; adjacent axes also swapped where their lengths differ by
    less than ``equal_axes_ratio``) and the image axes as they are.
    """
    pc = str(ct_meta.get("patient_position") or "").upper()
    pm = str(mri_meta.get("patient_position") or "").upper()
    if pc in POSITION_RAS and pm in POSITION_RAS:
        r = POSITION_RAS[pc] @ POSITION_RAS[pm].T
        hyps = [(f"DICOM Patient Position (CT {pc}, MRI {pm})", r)]
        if rotation_angle_deg(r) > 1.0:
            hyps.append(("DICOM patient frame as stored", np.eye(3)))
        return f"DICOM Patient Position CT {pc} / MRI {pm}", hyps
    missing = "no Patient Position (NRRD/NIfTI)" if not (pc or pm) else f"Patient Position CT '{pc}', MRI '{pm}'"
    hyps = [("image axes", np.eye(3))]
    _, wc, vc = _moments(ct_pts)
    _, wm, vm = _moments(mri_pts)
    perms = [(0, 1, 2)]
    for a in (0, 1):
        if wc[a] / wc[a + 1] < equal_axes_ratio or wm[a] / wm[a + 1] < equal_axes_ratio:
            p = [0, 1, 2]
            p[a], p[a + 1] = p[a + 1], p[a]
            perms.append(tuple(p))
    for perm in perms:
        for signs in itertools.product((1.0, -1.0), repeat=3):
            r = vc @ np.diag(signs) @ vm[:, list(perm)].T
            if np.linalg.det(r) < 0:
                continue
            if all(rotation_angle_deg(r @ h.T) > 30.0 for _, h in hyps):
                hyps.append((f"principal axes {''.join('+' if s > 0 else '-' for s in signs)}"
                             f"{'' if perm == (0, 1, 2) else ' swapped ' + str(perm)}", r))
    return f"principal axes multi-start ({missing})", hyps


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
def _lps_init(m_ras: np.ndarray, centre_lps):
    from RegistrationFusionLib.registration.refine import _rigid_from_matrix

    return _rigid_from_matrix(ras_to_lps_matrix(np.linalg.inv(m_ras)), np.asarray(centre_lps, float))


def register_intensity(ct: RasVolume, mri: RasVolume, *, grid_mm: float = 3.0, bins: int = 32,
                       perturb_deg: float = 15.0, iterations: int = 120, samples: int = 30_000,
                       refine_best: int = 6, agreement_mm: float = 3.0, min_agreeing: int = 2,
                       min_mi_gain: float = 0.01, min_margin: float = 0.05, error_floor_mm: float = 1.5,
                       margin_mm: float = 10.0, relaxation: float = 0.8, min_step: float = 0.02, seed: int = 3,
                       progress: Callable[[float, str], None] | None = None,
                       should_cancel: Callable[[], bool] | None = None) -> IntensityFusionResult:
    """Capsule-free rigid MRI->CT registration by mutual information from several starts (see module doc).

    ``ct`` in HU, ``mri`` an anatomical MRI; both as RasVolume (RAS mm). Work happens on images
    block-averaged to about ``grid_mm``; the metric is evaluated in the CT body (above -400 HU) dilated by
    ``margin_mm``. Each hypothesis gets 5 starts (itself and +-``perturb_deg`` about
    R and S); all are registered at the coarse level, the ``refine_best`` best (by MI) also at the working
    grid. Acceptance thresholds: ``min_mi_gain`` (nats), ``agreement_mm``, ``min_agreeing``, ``min_margin``
    (fraction of the best MI). Returns an :class:`IntensityFusionResult` (accepted or not); raises
    :class:`RegistrationFusionError` only for unusable inputs or cancellation.
    """
    import SimpleITK as sitk

    t0 = time.perf_counter()

    def report(f, msg):
        if progress:
            progress(float(f), msg)
        if should_cancel and should_cancel():
            raise RegistrationFusionError("the capsule-free fusion was cancelled; nothing was changed")

    report(0.0, "capsule-free fusion: preparing images")
    fixed = _working_image(ct, grid_mm, (-1000.0, 1500.0))
    mri_arr = np.asarray(mri.array, float)
    hi = float(np.percentile(mri_arr[np.isfinite(mri_arr)], 99.5))
    moving = _working_image(mri, grid_mm, (0.0, hi) if hi > 0 else None)
    fmask, fm = _body_mask(fixed, "ct")
    mmask, mm = _body_mask(moving, "mr")
    # the metric sees the body and a rim of air around it (the outline is the strongest common edge),
    # not the empty air further out
    fmask = sitk.BinaryDilate(fmask, [max(1, int(round(margin_mm / sp))) for sp in fixed.GetSpacing()])
    ct_pts = _mask_points_ras(fixed, fm, 20_000, seed)
    mr_pts = _mask_points_ras(moving, mm, 20_000, seed)
    c_ct, c_mr = ct_pts.mean(axis=0), mr_pts.mean(axis=0)
    centre_lps = c_ct * np.array([-1.0, -1.0, 1.0])
    prior, hyps = pose_hypotheses(ct.meta, mri.meta, ct_pts, mr_pts)
    eval_pts = ct_pts[:: max(1, len(ct_pts) // 3000)]

    n_fixed = float(np.prod(fixed.GetSize()))

    def method(shrink: int):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(float(min(1.0, samples * shrink ** 3 / n_fixed)), int(seed))
        reg.SetMetricFixedMask(fmask)
        reg.SetInterpolator(sitk.sitkLinear)
        return reg

    evaluator = sitk.ImageRegistrationMethod()
    evaluator.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    evaluator.SetMetricSamplingStrategy(evaluator.NONE)
    evaluator.SetMetricFixedMask(fmask)
    evaluator.SetInterpolator(sitk.sitkLinear)

    def mi(m_ras) -> float:
        from SmartBiopsyCoreLib.dataio.transforms import itk_from_ras

        evaluator.SetInitialTransform(itk_from_ras(m_ras))
        try:
            return -float(evaluator.MetricEvaluate(fixed, moving))
        except RuntimeError:  # no overlap at all (or Ctrl-C inside ITK, which stops here)
            from SmartBiopsyCoreLib.interruption import raise_if_interrupted

            raise_if_interrupted()
            return float("-inf")

    def run(m_ras, levels, sigmas, its):
        from SmartBiopsyCoreLib.dataio.transforms import ras_from_itk

        reg = method(levels[-1])
        reg.SetInitialTransform(_lps_init(m_ras, centre_lps), inPlace=False)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=float(min_step), numberOfIterations=int(its),
                                                     relaxationFactor=float(relaxation), gradientMagnitudeTolerance=1e-8,
                                                     estimateLearningRate=reg.Once,
                                                     maximumStepSizeInPhysicalUnits=float(2 * grid_mm))
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(list(levels))
        reg.SetSmoothingSigmasPerLevel(list(sigmas))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        from SmartBiopsyCoreLib.interruption import run_itk

        try:
            out = run_itk(reg, fixed, moving)  # = reg.Execute(fixed, moving), stopped at once by Ctrl-C
        except RuntimeError as exc:
            from SmartBiopsyCoreLib.interruption import raise_if_interrupted

            raise_if_interrupted()  # Ctrl-C inside ITK: stop, do not try the next start
            logger.debug("start failed: %s", str(exc).splitlines()[-1][:120])
            return m_ras, 0
        return ras_from_itk(out), int(reg.GetOptimizerIteration())

    # starts: each hypothesis and small rotations about it (about the CT body centre)
    starts: list[IntensityStart] = []
    for name, r in hyps:
        for label, dr in [("", np.eye(3))] + [(f" {'RS'[i // 2]}{'+-'[i % 2]}{perturb_deg:g}deg",
                                                _rot(0 if i < 2 else 2, perturb_deg * (1 - 2 * (i % 2))))
                                               for i in range(4)]:
            rr = dr @ r
            m = np.eye(4)
            m[:3, :3] = rr
            m[:3, 3] = c_ct - rr @ c_mr
            starts.append(IntensityStart(name + label, m, m, mi(m), float("nan")))
    n = len(starts)
    for i, s in enumerate(starts):
        report(0.05 + 0.55 * i / n, f"capsule-free fusion: start {i + 1}/{n} (coarse)")
        s.refined, s.iterations = run(s.initial, [2], [2.0 * grid_mm], iterations)
        s.mi_final = mi(s.refined)
    order = sorted(range(n), key=lambda i: -starts[i].mi_final)
    for rank, i in enumerate(order[:refine_best]):
        report(0.6 + 0.35 * rank / refine_best, f"capsule-free fusion: refining start {rank + 1}/{refine_best}")
        s = starts[i]
        m2, it2 = run(s.refined, [1], [0.5 * grid_mm], iterations)
        mi2 = mi(m2)
        if mi2 >= s.mi_final:
            s.refined, s.mi_final, s.iterations = m2, mi2, s.iterations + it2
    # rank only fully refined starts: coarse-only ones are not comparable with them
    refined_idx = order[:refine_best]
    ranked = sorted(refined_idx, key=lambda i: -starts[i].mi_final)
    best = starts[ranked[0]]
    inv_best = np.linalg.inv(best.refined)
    in_mr = _inside(mri, eval_pts @ inv_best[:3, :3].T + inv_best[:3, 3])
    pts = eval_pts[in_mr] if in_mr.sum() >= 50 else eval_pts

    def dist(a, b) -> float:
        ia, ib = np.linalg.inv(a), np.linalg.inv(b)
        d = (pts @ ia[:3, :3].T + ia[:3, 3]) - (pts @ ib[:3, :3].T + ib[:3, 3])
        return float(np.sqrt(np.mean(np.sum(d ** 2, axis=1))))

    for s in starts:
        s.distance_to_best_mm = dist(s.refined, best.refined)
    accepted, reasons, n_agree, spread, mi_gain, margin = assess_starts(
        [starts[i] for i in ranked], agreement_mm=agreement_mm, min_agreeing=min_agreeing, min_mi_gain=min_mi_gain,
        min_margin=min_margin)
    est = spread + error_floor_mm
    if accepted:
        reason = (f"capsule-free fusion accepted ({prior}): {n_agree} of {len(ranked)} refined starts agree "
                  f"within {spread:.1f} mm, mutual information {best.mi_initial:.3f} -> {best.mi_final:.3f} nats, "
                  f"next distinct alignment {100 * margin:.0f} % worse; intensity-only error estimate "
                  f"{est:.1f} mm")
    else:
        reason = ("the capsule-free fusion is ambiguous and was refused (" + "; ".join(reasons) + "); "
                  "register with skin capsules or supply a transform")
    logger.info(reason)
    report(1.0, "capsule-free fusion done")
    return IntensityFusionResult(
        best.refined, accepted, reason, prior, [starts[i] for i in order], n_agree, spread, error_floor_mm,
        est, mi_gain, margin, time.perf_counter() - t0,
        {"grid_mm": grid_mm, "bins": bins, "perturb_deg": perturb_deg, "agreement_mm": agreement_mm,
         "min_agreeing": min_agreeing, "min_mi_gain_nats": min_mi_gain, "min_margin_fraction": min_margin,
         "refined_starts": len(ranked), "hypotheses": [h for h, _ in hyps]})


def assess_starts(ranked: list[IntensityStart], *, agreement_mm: float, min_agreeing: int, min_mi_gain: float,
                  min_margin: float):
    """Is the best of the refined starts (``ranked`` by MI, best first, ``distance_to_best_mm`` filled) unambiguous?

    Returns (accepted, reasons, n_agreeing, spread_mm, mi_gain_nats, margin_fraction). Accepted only when the
    best start gained at least ``min_mi_gain`` nats over its initial pose, at least ``min_agreeing`` starts lie
    within ``agreement_mm`` of it, and the best start further away has an MI lower by at least ``min_margin``
    of the best MI.
    """
    best = ranked[0]
    agreeing = [s for s in ranked if s.distance_to_best_mm <= agreement_mm]
    others = [s for s in ranked if s.distance_to_best_mm > agreement_mm]
    spread = max(s.distance_to_best_mm for s in agreeing)
    mi_gain = best.mi_final - best.mi_initial
    second = others[0].mi_final if others else float("-inf")
    margin = ((best.mi_final - second) / abs(best.mi_final) if best.mi_final != 0 and np.isfinite(second)
              else float("inf"))
    reasons = []
    if not np.isfinite(best.mi_final) or not mi_gain >= min_mi_gain:
        reasons.append(f"mutual information hardly improved from the initial pose ({best.mi_initial:.3f} -> "
                       f"{best.mi_final:.3f} nats, {min_mi_gain:g} needed)")
    if len(agreeing) < min_agreeing:
        reasons.append(f"only {len(agreeing)} of {len(ranked)} refined starts reached the best alignment "
                       f"(within {agreement_mm:g} mm; {min_agreeing} needed)")
    if others and not margin >= min_margin:
        reasons.append(f"a different alignment {others[0].distance_to_best_mm:.0f} mm away fits almost "
                       f"as well (mutual information {second:.3f} vs {best.mi_final:.3f} nats)")
    return not reasons, reasons, len(agreeing), float(spread), float(mi_gain), float(margin)


def _inside(vol: RasVolume, pts_ras: np.ndarray) -> np.ndarray:
    ijk = vol.ras_to_ijk_points(pts_ras)
    shape = np.array(vol.array.shape[::-1])
    return np.all((ijk >= -0.5) & (ijk <= shape - 0.5), axis=1)

"""Registration quality assurance: numbers, pass/fail against thresholds, qa.json and fused pictures.

All distances in mm, points in CT RAS; the transform is the 4x4 RAS MRI->CT matrix. The pictures show
the MRI resampled onto the CT grid (checkerboard and colour overlay) through a given CT-RAS point, in the
three orthogonal planes of the CT grid, in the radiological convention (patient right on the image's left) with
orientation letters and a mm scale bar on every panel. matplotlib (optional: Slicer does not bundle it) is used only there,
through its object-oriented ``Figure`` + ``FigureCanvasAgg`` API: no pyplot, no global backend switch.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from RegistrationFusionLib.errors import RegistrationFusionError
from SmartBiopsyCoreLib.geometry import RasVolume
from SmartBiopsyCoreLib.optional import require

logger = logging.getLogger(__name__)


@dataclass
class QAThresholds:
    """Pass/fail limits (mm)."""

    max_fre_mm: float = 2.0
    max_predicted_tre_mm: float = 3.0
    max_loo_mm: float = 4.0
    min_markers: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QATarget:
    name: str
    ras: list
    predicted_tre_mm: float
    predicted_tre_fwm_mm: float
    refinement_displacement_mm: float | None = None
    #: the error model's 95th percentile at the target (capsule TRE + unmodelled deformation, see error_model)
    predicted_error_p95_mm: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QAReport:
    """Everything a radiologist needs to trust (or not) the fusion; ``passed`` with the failed checks listed."""

    passed: bool
    failures: list[str]
    thresholds: QAThresholds
    fre_mm: float
    markers: list[dict]
    excluded: list[dict]
    targets: list[QATarget]
    matrix_mri_to_ct_ras: list
    correspondence: dict | None = None
    refinement: dict | None = None
    notes: list[str] = field(default_factory=list)
    pictures: dict = field(default_factory=dict)
    #: "capsules" (landmark FRE/TRE above) or "intensity-only" (no capsule FRE/TRE: ``fre_mm`` is NaN and
    #: ``error_estimate_mm`` is the spread of agreeing starts plus a floor, see registration.intensity)
    method: str = "capsules"
    error_estimate_mm: float | None = None
    error_model: dict | None = None
    target_depths: dict | None = None
    #: the capsule registration (``PointRegistration.to_dict``, with the capsules' localisation covariances):
    #: enough to predict the error at targets chosen after the QA (``error_model.predictor_from_qa``)
    capsule_registration: dict | None = None

    def to_dict(self) -> dict:
        return {
            "method": self.method, "error_estimate_mm": self.error_estimate_mm,
            "error_model": self.error_model, "targetable_depth_mm": self.target_depths,
            "capsule_registration": self.capsule_registration,
            "passed": bool(self.passed), "failures": list(self.failures),
            "thresholds": self.thresholds.to_dict(),
            "fre_mm": float(self.fre_mm) if np.isfinite(self.fre_mm) else None,
            "markers": self.markers, "excluded": self.excluded,
            "targets": [t.to_dict() for t in self.targets],
            "matrix_mri_to_ct_ras": self.matrix_mri_to_ct_ras,
            "correspondence": self.correspondence, "refinement": self.refinement,
            "notes": list(self.notes), "pictures": dict(self.pictures),
            "units": {"distances": "mm", "points": "CT RAS mm", "transform": "4x4 RAS, maps MRI points to CT points"},
        }

    def write_json(self, path) -> str:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1, allow_nan=False, default=_json_default)
        return path


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o)} is not JSON serialisable")


def _clean(x):
    """Replace NaN by None recursively (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _named_targets(targets_ct) -> dict:
    """{name: RAS point} from {name: point}, (M, 3) points (named T1..TM) or None (no targets)."""
    if targets_ct is None:
        return {}
    if isinstance(targets_ct, dict):
        return {str(k): np.asarray(v, float).reshape(3) for k, v in targets_ct.items()}
    return {f"T{i + 1}": p for i, p in enumerate(np.asarray(targets_ct, float).reshape(-1, 3))}


def build_report(registration, targets_ct: dict | np.ndarray | None = None, *, correspondence=None,
                 refinement=None, thresholds: QAThresholds | None = None) -> QAReport:
    """QA report from a :class:`landmarks.PointRegistration` (+ optional Correspondence and RefinementResult).

    ``targets_ct``: {name: RAS point} or (M, 3) CT-RAS points (mm). Predicted TRE is the landmark
    prediction (anisotropic FLE aware); with an accepted refinement the report also gives how far the
    refinement moved each target relative to the landmark transform.
    """
    th = thresholds or QAThresholds()
    named = _named_targets(targets_ct)
    failures, notes = [], []
    reg_d = registration.to_dict()
    markers = _clean(reg_d["markers"])
    n_used = len(registration.used)
    if n_used < th.min_markers:
        failures.append(f"only {n_used} capsules used (at least {th.min_markers} needed)")
    if registration.fre_mm > th.max_fre_mm:
        failures.append(f"FRE {registration.fre_mm:.2f} mm exceeds {th.max_fre_mm:.2f} mm")
    loo = registration.loo_mm[np.isfinite(registration.loo_mm)]
    if len(loo) and loo.max() > th.max_loo_mm:
        failures.append(f"leave-one-out error {loo.max():.2f} mm at one capsule exceeds {th.max_loo_mm:.2f} mm")
    if not len(loo):
        notes.append("leave-one-out error unavailable (needs at least 4 capsules that stay non-collinear)")
    targets = []
    matrix = registration.matrix
    ref_d = None
    if refinement is not None:
        ref_d = _clean(refinement.to_dict())
        matrix = refinement.matrix
        notes.append(refinement.reason)
        if refinement.deformable_reason:
            notes.append(refinement.deformable_reason)
    errors = None
    if named:
        from RegistrationFusionLib.registration.error_model import predict_target_errors

        pts = np.array(list(named.values()))
        pred = registration.predicted_tre(pts)
        fwm = registration.predicted_tre_fwm(pts)
        disp = [None] * len(pts)
        if refinement is not None:
            cand = refinement.matrix @ np.linalg.inv(registration.matrix)
            disp = list(np.linalg.norm(pts @ cand[:3, :3].T + cand[:3, 3] - pts, axis=1))
        # the honest error at each target: the capsule TRE alone says nothing about the deformation under the skin
        errors = predict_target_errors(
            registration, named, refined_matrix=None if refinement is None else refinement.candidate_matrix,
            refined_used=bool(refinement is not None and refinement.accepted))
        for (name, p), t, f, d, e in zip(named.items(), pred, fwm, disp, errors.targets):
            targets.append(QATarget(name, [float(v) for v in p], float(t), float(f), None if d is None else float(d),
                                    float(e.p95_mm)))
            if t > th.max_predicted_tre_mm:
                failures.append(f"predicted TRE {t:.2f} mm at target {name} exceeds {th.max_predicted_tre_mm:.2f} mm")
    if correspondence is not None and getattr(correspondence, "note", ""):
        notes.append(correspondence.note)
    for e in registration.excluded:
        notes.append(e.reason)
    report = QAReport(not failures, failures, th, float(registration.fre_mm), markers,
                      [e.to_dict() for e in registration.excluded], targets, np.asarray(matrix).tolist(),
                      None if correspondence is None else correspondence.to_dict(), ref_d, notes)
    report.capsule_registration = _clean(reg_d)
    if errors is not None:
        report.error_model = errors.to_dict()
    logger.info("registration QA %s%s", "passed" if report.passed else "FAILED: ", "; ".join(failures))
    return report


def build_intensity_report(result, targets_ct: dict | np.ndarray | None = None,
                           thresholds: QAThresholds | None = None) -> QAReport:
    """QA report of a capsule-free fusion (:class:`registration.intensity.IntensityFusionResult`).

    It says that the fusion is intensity-only: no capsule FRE, no markers, no landmark TRE. ``passed``
    only when the result was accepted (unambiguous) and its error estimate (mm, the same at every
    target: spread between agreeing starts plus the stated floor) is within ``max_predicted_tre_mm``.
    Targets get that estimate as their predicted error.
    """
    th = thresholds or QAThresholds()
    named = _named_targets(targets_ct)
    est = float(result.error_estimate_mm)
    failures = []
    if not result.accepted:
        failures.append(result.reason)
    elif est > th.max_predicted_tre_mm:
        failures.append(f"intensity-only error estimate {est:.2f} mm exceeds {th.max_predicted_tre_mm:.2f} mm")
    notes = [f"intensity-only fusion (no skin capsules used, {result.prior}): no capsule FRE/TRE exists; error "
             f"estimate {est:.1f} mm = spread of {result.n_agreeing} agreeing starts {result.spread_mm:.1f} mm + "
             f"floor {result.error_floor_mm:.1f} mm", result.reason]
    # the estimate is used as a 95th percentile (as the workflow's hit probability takes it)
    targets = [QATarget(n, [float(v) for v in p], est, est, None, est) for n, p in named.items()]
    rep = QAReport(not failures, failures, th, float("nan"), [], [], targets, np.asarray(result.matrix).tolist(),
                   None, _clean(result.to_dict()), notes, method="intensity-only", error_estimate_mm=est)
    logger.info("intensity-only fusion QA %s%s", "passed" if rep.passed else "FAILED: ", "; ".join(failures))
    return rep


def check_targetable_depth(report: QAReport, errors, targetable_depth_mm: dict) -> QAReport:
    """Fail QA for every target whose predicted 95th-percentile error exceeds its targetable depth.

    ``errors``: an :class:`~RegistrationFusionLib.registration.error_model.ErrorModelResult`;
    ``targetable_depth_mm``: {target name: mm} - the registration error the target can absorb (its depth in
    the habitat minus the needle placement error and half the notch). Rule: p95 > targetable depth is a QA
    failure (not a warning): the notch could then sample another habitat. A target without a prediction or
    depth also fails (nothing passes by default). Returns ``report`` updated in place.
    """
    pred = {t.name: t for t in errors.targets}
    depths = {str(k): float(v) for k, v in dict(targetable_depth_mm).items()}
    for name in sorted(set(pred) | set(depths)):
        if name not in pred or name not in depths or not np.isfinite(depths[name]):
            report.failures.append(f"target {name} has no predicted error or no targetable depth")
            continue
        if not pred[name].p95_mm <= depths[name]:
            report.failures.append(
                f"predicted 95th-percentile registration error {pred[name].p95_mm:.1f} mm at target {name} exceeds "
                f"its targetable depth {depths[name]:.1f} mm")
    report.passed = not report.failures
    report.error_model = errors.to_dict()
    for t in report.targets:  # the QA's targets carry the same prediction as the error model it was checked with
        if t.name in pred:
            t.predicted_error_p95_mm = float(pred[t.name].p95_mm)
    report.target_depths = depths
    logger.info("registration QA with target depths %s", "passed" if report.passed else "FAILED")
    return report


# ------------------------------------------------------------------------------------------------
# pictures
# ------------------------------------------------------------------------------------------------
def _window(a: np.ndarray, lo_pct=1.0, hi_pct=99.0) -> np.ndarray:
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros_like(a, dtype=float)
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    return np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


def _planes(vol: RasVolume, point_ras):
    """Axial, coronal and sagittal slices of the grid through the voxel nearest ``point_ras``, each in the
    radiological convention (:mod:`SmartBiopsyCoreLib.display`: patient right on the image's left)."""
    from SmartBiopsyCoreLib.display import oriented_slice

    try:
        return [oriented_slice(vol, point_ras, view) for view in ("axial", "coronal", "sagittal")]
    except ValueError:
        raise RegistrationFusionError("the QA point lies outside the CT volume; choose a point inside the CT") from None


def write_fusion_pictures(ct: RasVolume, mri_on_ct: RasVolume, point_ras, out_dir, *, prefix: str = "fusion",
                          squares: int = 8, ct_window: tuple[float, float] | None = (-200.0, 300.0)) -> dict:
    """Write ``<prefix>_checkerboard.png`` and ``<prefix>_overlay.png`` through ``point_ras`` (CT RAS mm).

    ``mri_on_ct`` must already be resampled onto the CT grid. ``ct_window``: HU (level window) or None for
    percentiles. Returns {"checkerboard": path, "overlay": path}. Without matplotlib raises
    :class:`SmartBiopsyCoreLib.optional.MissingPackageError` (a SmartBiopsyError) before writing anything.
    """
    if not mri_on_ct.same_grid(ct):
        raise RegistrationFusionError("the MRI must be resampled onto the CT grid before making fusion pictures")
    ct_pl = _planes(ct, point_ras)
    mr_pl = _planes(mri_on_ct, point_ras)
    require("matplotlib", "Fusion pictures")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from SmartBiopsyCoreLib.display import draw_orientation_letters, draw_scale_bar, save_png

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for kind in ("checkerboard", "overlay"):
        fig = Figure(figsize=(12, 4.4), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 3)
        for ax, cs, ms in zip(axes, ct_pl, mr_pl):
            c, m = cs.image, ms.image
            if ct_window is not None:
                cw = np.clip((c.astype(float) - ct_window[0]) / (ct_window[1] - ct_window[0]), 0, 1)
            else:
                cw = _window(c.astype(float))
            mw = _window(m.astype(float))
            show = {"extent": cs.extent, "interpolation": "nearest", "aspect": "equal"}
            if kind == "checkerboard":
                yy, xx = np.indices(c.shape)
                sq = max(1, min(c.shape) // squares)
                board = ((yy // sq + xx // sq) % 2).astype(bool)
                ax.imshow(np.where(board, cw, mw), cmap="gray", vmin=0, vmax=1, **show)
            else:
                ax.imshow(cw, cmap="gray", vmin=0, vmax=1, **show)
                ax.imshow(np.ma.masked_less(mw, 0.05), cmap="hot", alpha=0.45, vmin=0, vmax=1, **show)
            ax.set_title(f"{cs.view}: {'CT | MRI' if kind == 'checkerboard' else 'CT + MRI (hot)'}")
            ax.set_xticks([])
            ax.set_yticks([])
            draw_orientation_letters(ax, cs.u, cs.v)
            draw_scale_bar(ax)
        if kind == "checkerboard":
            key = [Patch(facecolor="#444444", edgecolor="black", label="squares alternate: CT | MRI resampled on the CT")]
        else:
            key = [Patch(facecolor="#808080", edgecolor="black", label="CT (grey)"),
                   Patch(facecolor="#e03000", edgecolor="black", label="MRI (hot colours, dark to bright)")]
        fig.legend(handles=key, loc="lower center", ncol=len(key), fontsize=9, frameon=False)
        fig.suptitle(f"MRI fused on CT through R {point_ras[0]:.1f}, A {point_ras[1]:.1f}, S {point_ras[2]:.1f} mm")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        path = os.path.join(out_dir, f"{prefix}_{kind}.png")
        save_png(fig, path)
        paths[kind] = path
    return paths

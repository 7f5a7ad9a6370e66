"""Find the inserted biopsy needle in a confirmation CT and compare it with the plan.

Method (all in Slicer RAS, millimetres; CT in HU):

1. Candidate voxels: brighter than ``threshold_hu`` (metal) and inside a search cylinder of
   ``search_radius_mm`` around the planned line (from a little outside the entry to well beyond the target).
2. Robust line: RANSAC over candidate voxel centres (score = summed intensity of voxels within the inlier
   distance), keeping the longest contiguous run of inliers along the line, so bone, clips or streaks
   near the path do not pull the axis.
3. Sub-voxel axis: intensity-weighted principal axis of all voxels around the RANSAC line (background
   subtracted, not thresholded), which averages partial volume out; two iterations.
4. Tip: mean intensity over a disc around the axis is sampled along the axis (trilinear), and the tip is
   the half-maximum crossing between the shaft plateau and the tissue beyond, interpolated between samples.
5. Error against the plan: the actual tip's offset from the planned target is split into depth (along the
   planned direction, positive = deeper) and lateral (perpendicular distance from the planned line), plus
   the angle between the planned and actual axes.

When no needle is found the function refuses with a sentence naming what it looked for and, when a
needle-like metal object exists elsewhere, how far it is from the planned path.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

from SmartBiopsyCoreLib.geometry import RasVolume

from SmartBiopsyCoreLib.errors import InputDataError, SmartBiopsyError

logger = logging.getLogger(__name__)

#: Outer diameter used when neither a needle model nor a diameter is given (18 G, mm).
DEFAULT_OUTER_DIAMETER_MM = 1.27


class NeedleNotFoundError(SmartBiopsyError):
    """No needle could be found near the planned path in the confirmation CT."""


def _first_attr(obj, names):
    for n in names:
        if obj is None:
            return None
        if isinstance(obj, dict) and obj.get(n) is not None:
            return obj[n]
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return None


def resolve_needle_geometry(needle=None, *, outer_diameter_mm=None, notch_length_mm=None, notch_offset_mm=None,
                            core_diameter_mm=None) -> dict:
    """Needle geometry (mm) from a needle model and overrides.

    ``needle``: a ``TrajectoryPlannerLib.planning.needles.NeedleModel`` (its core needle is used), a catalogue name,
    a ``CoreNeedle``, a dict, or None.

    Explicit keyword values win over the model. Returns a dict with ``outer_diameter_mm``,
    ``notch_length_mm``, ``notch_offset_mm`` (distance from the tip to the distal end of the side notch),
    ``core_diameter_mm``, ``kind`` ("side-notch", "end-cut" or None) and ``name``.
    """
    model_name = None
    if isinstance(needle, str):
        from TrajectoryPlannerLib.errors import TrajectoryPlannerError
        from TrajectoryPlannerLib.planning.needles import get_needle
        try:
            needle = get_needle(needle)
        except TrajectoryPlannerError as exc:
            raise InputDataError(str(exc)) from None
    if needle is not None and getattr(needle, "core", None) is not None:
        # TrajectoryPlannerLib.planning.needles.NeedleModel: the core needle is what sits in the tissue at sampling.
        model_name = getattr(needle, "name", None)
        needle = needle.core
    od = outer_diameter_mm if outer_diameter_mm is not None else _first_attr(
        needle, ("outer_diameter_mm", "diameter_mm", "od_mm"))
    if od is None:
        od = DEFAULT_OUTER_DIAMETER_MM
    nl = notch_length_mm if notch_length_mm is not None else _first_attr(
        needle, ("notch_length_mm", "notch_mm", "sample_notch_mm"))
    no = notch_offset_mm if notch_offset_mm is not None else _first_attr(
        needle, ("notch_offset_mm", "notch_offset_from_tip_mm", "tip_to_notch_mm", "notch_distance_from_tip_mm"))
    cd = core_diameter_mm if core_diameter_mm is not None else _first_attr(
        needle, ("core_diameter_mm", "inner_diameter_mm"))
    kind = _first_attr(needle, ("design", "kind", "cut_type", "tip_type", "type"))
    if kind is None and needle is not None:
        side = _first_attr(needle, ("side_notch", "is_side_notch"))
        if side is not None:
            kind = "side-notch" if side else "end-cut"
    if hasattr(kind, "value"):
        kind = kind.value
    if isinstance(kind, str):
        kind = kind.lower().replace("_", "-").replace(" ", "-")
    od = float(od)
    if not np.isfinite(od) or od <= 0 or od > 10:
        raise InputDataError(f"needle outer diameter {od} mm is not plausible (expected 0.3-10 mm); check the needle model")
    return {
        "outer_diameter_mm": od,
        "notch_length_mm": None if nl is None else float(nl),
        "notch_offset_mm": None if no is None else float(no),
        "core_diameter_mm": float(cd) if cd is not None else od,
        "kind": kind,
        "name": model_name or _first_attr(needle, ("name", "label", "model")),
    }


@dataclass
class NeedleDetection:
    """The needle found in a confirmation CT, and its error against the plan (RAS mm, degrees)."""

    target_name: str
    tip_ras: np.ndarray
    axis: np.ndarray  #: unit vector along the needle, pointing towards the tip (insertion direction)
    shaft_start_ras: np.ndarray  #: most proximal needle point found inside the search cylinder
    visible_length_mm: float
    planned_entry_ras: np.ndarray
    planned_target_ras: np.ndarray
    tip_error_mm: float  #: 3-D distance actual tip - planned target
    lateral_error_mm: float  #: perpendicular distance of the actual tip from the planned line
    depth_error_mm: float  #: along the planned direction; positive = beyond (deeper than) the target
    angle_deg: float  #: angle between the planned and the actual axis
    lateral_vector_ras: np.ndarray
    axis_rms_mm: float  #: intensity-weighted RMS distance of the needle voxels from the fitted axis
    plateau_hu: float
    background_hu: float
    threshold_hu: float
    search_radius_mm: float
    n_voxels: int
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        vec = lambda v: [round(float(x), 4) for x in v]  # noqa: E731
        return {
            "target_name": self.target_name,
            "tip_ras": vec(self.tip_ras),
            "axis": vec(self.axis),
            "shaft_start_ras": vec(self.shaft_start_ras),
            "visible_length_mm": round(float(self.visible_length_mm), 3),
            "planned_entry_ras": vec(self.planned_entry_ras),
            "planned_target_ras": vec(self.planned_target_ras),
            "tip_error_mm": round(float(self.tip_error_mm), 3),
            "lateral_error_mm": round(float(self.lateral_error_mm), 3),
            "depth_error_mm": round(float(self.depth_error_mm), 3),
            "angle_deg": round(float(self.angle_deg), 3),
            "lateral_vector_ras": vec(self.lateral_vector_ras),
            "axis_rms_mm": round(float(self.axis_rms_mm), 4),
            "plateau_hu": round(float(self.plateau_hu), 1),
            "background_hu": round(float(self.background_hu), 1),
            "threshold_hu": float(self.threshold_hu),
            "search_radius_mm": float(self.search_radius_mm),
            "n_voxels": int(self.n_voxels),
            "warnings": list(self.warnings),
            "frame": "RAS",
            "units": "mm, degrees, HU",
        }


@dataclass
class PlacementError:
    """Actual tip vs planned target (mm, degrees), split along and across the planned line."""

    tip_error_mm: float
    lateral_error_mm: float
    depth_error_mm: float
    angle_deg: float
    lateral_vector_ras: np.ndarray


def placement_error(planned_entry_ras, planned_target_ras, tip_ras, axis=None) -> PlacementError:
    """Split ``tip_ras - planned_target_ras`` into depth (along the plan, + = deeper) and lateral parts."""
    e = np.asarray(planned_entry_ras, float)
    t = np.asarray(planned_target_ras, float)
    d = t - e
    d = d / np.linalg.norm(d)
    v = np.asarray(tip_ras, float) - t
    depth = float(v @ d)
    lat = v - depth * d
    angle = 0.0
    if axis is not None:
        a = np.asarray(axis, float)
        a = a / np.linalg.norm(a)
        angle = float(np.degrees(np.arccos(np.clip(abs(a @ d), -1.0, 1.0))))
    return PlacementError(float(np.linalg.norm(v)), float(np.linalg.norm(lat)), depth, angle, lat)


# ------------------------------------------------------------------------------------------------------
def _validate_point(p, what):
    a = np.asarray(p, float).reshape(-1)
    if a.size != 3 or not np.all(np.isfinite(a)):
        raise InputDataError(f"the planned {what} is not a finite RAS point (got {p!r}); check the plan file")
    return a


def _index_box(ct: RasVolume, p0, p1, margin):
    lo = np.minimum(p0, p1) - margin
    hi = np.maximum(p0, p1) + margin
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = ct.ras_to_ijk_points(corners)
    i0, j0, k0 = np.floor(ijk.min(axis=0)).astype(int)
    i1, j1, k1 = np.ceil(ijk.max(axis=0)).astype(int) + 1
    nk, nj, ni = ct.array.shape
    return max(k0, 0), min(k1, nk), max(j0, 0), min(j1, nj), max(i0, 0), min(i1, ni)


def _tube_voxels(ct: RasVolume, p0, p1, radius_mm: float) -> np.ndarray:
    """Array indices (N, 3) k, j, i of the voxels whose centres lie within ``radius_mm`` of segment p0-p1.

    Works slice by slice on the small index block the tube crosses, so a long oblique needle in a large CT
    never materialises its full bounding box.
    """
    inv = ct.ras_to_ijk
    q0 = inv[:3, :3] @ p0 + inv[:3, 3]
    q1 = inv[:3, :3] @ p1 + inv[:3, 3]
    reach = radius_mm * np.linalg.norm(inv[:3, :3], axis=1)  # index-space reach along i, j, k
    nk, nj, ni = ct.array.shape
    seg = p1 - p0
    length = float(np.linalg.norm(seg))
    d = seg / length
    m = ct.ijk_to_ras
    out = []
    k_lo = max(int(np.floor(min(q0[2], q1[2]) - reach[2])), 0)
    k_hi = min(int(np.ceil(max(q0[2], q1[2]) + reach[2])), nk - 1)
    dq = q1 - q0
    for k in range(k_lo, k_hi + 1):
        if abs(dq[2]) > 1e-9:
            ta, tb = sorted(((k - reach[2] - q0[2]) / dq[2], (k + reach[2] - q0[2]) / dq[2]))
            ta, tb = max(ta, 0.0), min(tb, 1.0)
            if ta > tb:
                continue
        else:
            ta, tb = 0.0, 1.0
        qa, qb = q0 + ta * dq, q0 + tb * dq
        i0 = max(int(np.floor(min(qa[0], qb[0]) - reach[0])), 0)
        i1 = min(int(np.ceil(max(qa[0], qb[0]) + reach[0])), ni - 1)
        j0 = max(int(np.floor(min(qa[1], qb[1]) - reach[1])), 0)
        j1 = min(int(np.ceil(max(qa[1], qb[1]) + reach[1])), nj - 1)
        if i1 < i0 or j1 < j0:
            continue
        jj, ii = np.mgrid[j0:j1 + 1, i0:i1 + 1]
        ras = (m[:3, 0][:, None, None] * ii + m[:3, 1][:, None, None] * jj
               + (m[:3, 2] * k + m[:3, 3] - p0)[:, None, None])
        t = np.clip(np.tensordot(d, ras, axes=1), 0.0, length)
        r2 = (ras * ras).sum(axis=0) - 2 * t * np.tensordot(d, ras, axes=1) + t * t
        sel = r2 <= radius_mm * radius_mm
        if sel.any():
            out.append(np.stack([np.full(sel.sum(), k), jj[sel], ii[sel]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 3), int)


def _dist_to_segment(pts, p0, d, length):
    rel = pts - p0
    t = np.clip(rel @ d, 0.0, length)
    return np.linalg.norm(rel - np.outer(t, d), axis=1)


def _dist_to_line(pts, c, a):
    rel = pts - c
    t = rel @ a
    return np.linalg.norm(rel - np.outer(t, a), axis=1), t


def _weighted_pca(pts, w):
    c = (pts * w[:, None]).sum(axis=0) / w.sum()
    x = pts - c
    cov = (x * w[:, None]).T @ x / w.sum()
    vals, vecs = np.linalg.eigh(cov)
    return c, vecs[:, -1], vals[::-1]


def _longest_run(t, w, gap_mm):
    """Indices (into sorted order) of the contiguous run along t (gaps <= gap_mm) with the largest weight."""
    order = np.argsort(t)
    ts = t[order]
    breaks = np.flatnonzero(np.diff(ts) > gap_mm)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks + 1, [ts.size]])
    ws = w[order]
    sums = np.array([ws[s:e].sum() for s, e in zip(starts, ends)])
    b = int(np.argmax(sums))
    return order[starts[b]:ends[b]]


def _ransac_line(pts, w, inlier_mm, rng, iterations=300, min_sep_mm=5.0):
    n = pts.shape[0]
    best = (-1.0, None, None)
    if n < 2:
        return None, None
    # Sample pairs preferentially among bright voxels.
    p = w / w.sum()
    a_idx = rng.choice(n, size=iterations, p=p)
    b_idx = rng.choice(n, size=iterations, p=p)
    for a, b in zip(a_idx, b_idx):
        d = pts[b] - pts[a]
        ln = np.linalg.norm(d)
        if ln < min_sep_mm:
            continue
        d = d / ln
        dist, _ = _dist_to_line(pts, pts[a], d)
        score = w[dist <= inlier_mm].sum()
        if score > best[0]:
            best = (score, pts[a], d)
    if best[1] is None:
        # All candidates are within min_sep of each other: fall back to PCA.
        c, d, _ = _weighted_pca(pts, w)
        return c, d
    return best[1], best[2]


def detect_needle(ct: RasVolume, planned_entry_ras, planned_target_ras, *, target_name: str = "",
                  needle=None, outer_diameter_mm: float | None = None, search_radius_mm: float = 15.0,
                  threshold_hu: float = 1500.0, beyond_target_mm: float = 40.0, before_entry_mm: float = 20.0,
                  min_length_mm: float = 10.0, seed: int = 0,
                  progress: Callable[[float, str], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None) -> NeedleDetection:
    """Find the needle near the planned path in ``ct`` (HU) and measure its axis, tip and placement error.

    ``planned_entry_ras``/``planned_target_ras``: the plan (RAS mm). The search cylinder has radius
    ``search_radius_mm`` around the planned line from ``before_entry_mm`` outside the entry to
    ``beyond_target_mm`` beyond the target. Raises :class:`NeedleNotFoundError` when no line-like metal
    (> ``threshold_hu``) at least ``min_length_mm`` long is inside it.
    """
    def report(f, msg):
        if progress:
            progress(f, msg)
        if should_cancel and should_cancel():
            raise SmartBiopsyError("needle detection was cancelled")

    entry = _validate_point(planned_entry_ras, "entry point")
    target = _validate_point(planned_target_ras, "target")
    plan_len = float(np.linalg.norm(target - entry))
    if plan_len < 1.0:
        raise InputDataError("the planned entry and target coincide; check the plan for this target")
    if ct.array.size == 0:
        raise InputDataError("the confirmation CT is empty; load the confirmation CT series")
    if search_radius_mm <= 0:
        raise InputDataError("the needle search radius must be positive (mm)")
    d_plan = (target - entry) / plan_len
    label = f" for target {target_name}" if target_name else ""
    geo = resolve_needle_geometry(needle, outer_diameter_mm=outer_diameter_mm)
    radius = 0.5 * geo["outer_diameter_mm"]
    spacing = ct.spacing
    report(0.05, "searching for the needle near the planned path")

    # 1. candidates in the search cylinder -------------------------------------------------------------
    p0 = entry - before_entry_mm * d_plan
    seg_len = plan_len + before_entry_mm + beyond_target_mm
    p1 = p0 + seg_len * d_plan
    k0, k1, j0, j1, i0, i1 = _index_box(ct, p0, p1, search_radius_mm + float(spacing.max()))
    if k1 <= k0 or j1 <= j0 or i1 <= i0:
        raise NeedleNotFoundError(
            f"the planned path{label} lies outside the confirmation CT; check that the plan and the CT series "
            "belong to the same patient and frame")
    sub = ct.array[k0:k1, j0:j1, i0:i1]
    kji = np.argwhere(sub > threshold_hu)
    pts = ct.kji_to_ras_points(kji + [k0, j0, i0]) if kji.size else np.zeros((0, 3))
    if pts.shape[0]:
        keep = _dist_to_segment(pts, p0, d_plan, seg_len) <= search_radius_mm
        kji, pts = kji[keep], pts[keep]
    vals = sub[tuple(kji.T)].astype(float) if kji.size else np.zeros(0)
    logger.debug("needle candidates%s: %d voxels above %.0f HU", label, pts.shape[0], threshold_hu)
    if pts.shape[0] < 3:
        raise NeedleNotFoundError(_not_found_message(ct, entry, target, label, search_radius_mm, threshold_hu,
                                                     min_length_mm))
    report(0.3, "fitting the needle axis")

    # 2. RANSAC line + contiguous run -----------------------------------------------------------------
    rng = np.random.default_rng(seed)
    inlier_mm = max(1.5, radius + 0.6 * float(spacing.max()))
    w = vals - threshold_hu + 1.0
    c, a = _ransac_line(pts, w, inlier_mm, rng)
    dist, t = _dist_to_line(pts, c, a)
    inl = np.flatnonzero(dist <= inlier_mm)
    run = inl[_longest_run(t[inl], w[inl], gap_mm=max(10.0, 4.0 * float(spacing.max())))]
    c, a, _ = _weighted_pca(pts[run], w[run])
    dist, t = _dist_to_line(pts, c, a)
    inl = np.flatnonzero(dist <= inlier_mm)
    run = inl[_longest_run(t[inl], w[inl], gap_mm=max(10.0, 4.0 * float(spacing.max())))]
    if a @ d_plan < 0:
        a = -a
    _, t_run = _dist_to_line(pts[run], c, a)
    length = float(t_run.max() - t_run.min()) if run.size else 0.0
    if length < min_length_mm:
        raise NeedleNotFoundError(_not_found_message(ct, entry, target, label, search_radius_mm, threshold_hu,
                                                     min_length_mm, found_short=length))
    t_lo, t_hi = float(t_run.min()), float(t_run.max())
    report(0.5, "refining the needle axis")

    # 3.-4. sub-voxel axis, then tip from the profile; the profile also fixes the shaft extent when the
    # thresholded run stopped short (a thin needle split between two slices), so repeat once.
    half_diag = 0.5 * float(np.linalg.norm(spacing))
    rho = max(3.0, radius + half_diag + 1.0)
    t_far = float((p1 - c) @ a) + 5.0
    # voxels of the tube the refinement can reach (the axis moves by well under a millimetre)
    tube_kji = _tube_voxels(ct, c + (t_lo - 5.0) * a, c + max(t_far, t_hi) * a, rho + 6.0)
    box_pts = ct.kji_to_ras_points(tube_kji)
    box_vals = ct.array[tuple(tube_kji.T)].astype(float)
    warnings: list[str] = []
    axis_rms, bg, n_used = float("nan"), float("nan"), int(run.size)
    for it in range(2):
        fit = _refine_axis(box_pts, box_vals, c, a, t_lo, t_hi, rho)
        if fit is not None:
            c_new, a_new, axis_rms, bg, n_used = fit
            # keep the same parameter origin: express t_lo/t_hi for the new line
            t_lo = float((c + t_lo * a - c_new) @ a_new)
            t_hi = float((c + t_hi * a - c_new) @ a_new)
            c, a = c_new, a_new
        t_far = float((p1 - c) @ a) + 5.0
        prof_t, prof = _disc_profile(ct, c, a, t_lo - 5.0, max(t_far, t_hi + 6.0), radius + half_diag)
        tip_fit = _find_tip(prof_t, prof, t_hi, bg)
        if tip_fit is None:
            break
        t_tip, plateau, background, t_shaft, note = tip_fit
        t_hi = t_tip
        t_lo = min(t_lo, t_shaft)
    report(0.7, "locating the needle tip")
    if tip_fit is None:
        t_tip = t_hi
        plateau, background = float("nan"), bg
        warnings.append("the tip edge could not be located on the intensity profile; the deepest metal voxel was used")
    elif note:
        warnings.append(note)
    tip = c + t_tip * a
    start = c + t_lo * a
    report(0.9, "measuring the placement error")

    err = placement_error(entry, target, tip, a)
    if err.angle_deg > 20:
        warnings.append(f"the needle axis deviates {err.angle_deg:.0f} degrees from the plan; check that the "
                        "right needle was detected")
    det = NeedleDetection(
        target_name=target_name, tip_ras=tip, axis=a, shaft_start_ras=start, visible_length_mm=t_tip - t_lo,
        planned_entry_ras=entry, planned_target_ras=target, tip_error_mm=err.tip_error_mm,
        lateral_error_mm=err.lateral_error_mm, depth_error_mm=err.depth_error_mm, angle_deg=err.angle_deg,
        lateral_vector_ras=err.lateral_vector_ras, axis_rms_mm=axis_rms, plateau_hu=plateau,
        background_hu=background, threshold_hu=float(threshold_hu), search_radius_mm=float(search_radius_mm),
        n_voxels=int(n_used), warnings=warnings)
    logger.info("needle%s: tip %s, lateral %.1f mm, depth %+.1f mm, angle %.1f deg", label,
                np.round(tip, 1), err.lateral_error_mm, err.depth_error_mm, err.angle_deg)
    report(1.0, "needle found")
    return det


def _refine_axis(box_pts, box_vals, c, a, t_lo, t_hi, rho):
    """Intensity-weighted principal axis of the voxels within ``rho`` mm of the line (background subtracted)."""
    out = None
    for _ in range(3):
        r, tt = _dist_to_line(box_pts, c, a)
        along = (tt >= t_lo + 2.0) & (tt <= t_hi - 2.0)
        shell = along & (r > rho + 1.0) & (r <= rho + 4.0)
        core = along & (r <= rho)
        if shell.sum() < 10 or core.sum() < 10:
            break
        bg = float(np.median(box_vals[shell]))
        wc = np.clip(box_vals[core] - bg - 100.0, 0.0, None)
        if wc.sum() <= 0:
            break
        c_new, a_new, _ = _weighted_pca(box_pts[core], wc)
        if a_new @ a < 0:
            a_new = -a_new
        # move the centre back onto the old parameter origin to keep t comparable
        c_new = c_new + ((c - c_new) @ a_new) * a_new
        t_lo = float((c + t_lo * a - c_new) @ a_new)
        t_hi = float((c + t_hi * a - c_new) @ a_new)
        c, a = c_new, a_new
        rr, _ = _dist_to_line(box_pts[core], c, a)
        out = (c, a, float(np.sqrt((wc * rr ** 2).sum() / wc.sum())), bg, int((wc > 0).sum()))
    return out


def _disc_profile(ct, c, a, t0, t1, disc_r, step=0.1):
    """Mean intensity over a disc of radius ``disc_r`` around the axis, every ``step`` mm from t0 to t1 (trilinear)."""
    ts = np.arange(t0, t1, step)
    u = np.cross(a, np.eye(3)[int(np.argmin(np.abs(a)))])
    u /= np.linalg.norm(u)
    v = np.cross(a, u)
    offs = [np.zeros(3)]
    for rr_ in np.linspace(disc_r / 3, disc_r, 3):
        n_ang = 8 if rr_ < disc_r * 0.5 else 12
        for ang in np.linspace(0, 2 * np.pi, n_ang, endpoint=False):
            offs.append(rr_ * (np.cos(ang) * u + np.sin(ang) * v))
    offs = np.array(offs)
    samples = (c + np.outer(ts, a))[:, None, :] + offs[None, :, :]
    ijk = ct.ras_to_ijk_points(samples.reshape(-1, 3))
    prof = ndimage.map_coordinates(ct.array, ijk[:, ::-1].T, order=1, mode="nearest", cval=np.nan)
    return ts, prof.astype(float).reshape(ts.size, -1).mean(axis=1)


def _find_tip(ts, prof, t_hi, bg, stay_mm=5.0):
    """Half-maximum crossing after which the profile stays low for ``stay_mm``; None when there is no edge.

    Returns (t_tip, plateau, background, t_shaft_start, note).
    """
    step = float(ts[1] - ts[0]) if ts.size > 1 else 0.1
    plate_sel = (ts >= t_hi - 30.0) & (ts <= t_hi - 3.0)
    if plate_sel.sum() < 5:
        plate_sel = ts <= t_hi
    if not plate_sel.any():
        return None
    plateau = float(np.median(prof[plate_sel]))
    background = bg if np.isfinite(bg) else float(np.median(prof[-20:]))
    if plateau - background < 200:
        return None
    half = 0.5 * (plateau + background)
    low = prof < half
    low_run = np.zeros(ts.size + 1, int)
    for idx in range(ts.size - 1, -1, -1):
        low_run[idx] = low_run[idx + 1] + 1 if low[idx] else 0
    stay = int(round(stay_mm / step))
    i_start = max(int(np.searchsorted(ts, t_hi - 3.0)), 1)
    cand = np.flatnonzero(low[i_start:] & ~low[i_start - 1:-1]) + i_start
    cand = [int(i) for i in cand if low_run[i] >= stay or i + low_run[i] >= ts.size]
    if not cand:
        return None
    i = cand[0]
    y0, y1 = prof[i - 1], prof[i]
    frac = (y0 - half) / (y0 - y1) if y0 != y1 else 0.0
    t_tip = float(ts[i - 1] + np.clip(frac, 0.0, 1.0) * step)
    note = ""
    if i + low_run[i] >= ts.size and low_run[i] < stay:
        note = "the needle tip may lie outside the confirmation CT or the search region"
    # shaft start: walk back from the tip while the profile stays above half (gaps up to 3 mm allowed)
    high = np.flatnonzero(~low[:i])
    gaps = np.flatnonzero(np.diff(high) * step > 3.0)
    first = high[gaps[-1] + 1] if gaps.size else (high[0] if high.size else i - 1)
    return t_tip, plateau, background, float(ts[first]), note


def _not_found_message(ct, entry, target, label, radius, threshold, min_length, found_short=None) -> str:
    """Refusal sentence; looks through the whole CT for needle-like metal to say how far it is from the plan."""
    base = f"no metal needle (> {threshold:.0f} HU) found within {radius:g} mm of the planned path{label}"
    if found_short is not None and found_short > 0:
        base = (f"only a {found_short:.0f} mm long metal object (> {threshold:.0f} HU) was found within "
                f"{radius:g} mm of the planned path{label}, too short for a needle")
    far = _nearest_needle_like(ct, entry, target, threshold, min_length)
    if far is not None:
        return (f"{base}; the nearest needle-like metal object is {far:.0f} mm from the planned path - check that "
                "the confirmation CT and the plan belong together, or widen the search radius")
    return f"{base}; check the confirmation CT series (needle in place, HU values) and the plan"


def _nearest_needle_like(ct: RasVolume, entry, target, threshold, min_length) -> float | None:
    mask = ct.array > threshold
    if not mask.any():
        return None
    # crop to the bright voxels, then bridge the gaps of a thin needle split between slices
    nz = np.argwhere(mask)
    lo = np.maximum(nz.min(axis=0) - 3, 0)
    hi = nz.max(axis=0) + 4
    crop = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    bridged = ndimage.binary_dilation(crop, structure=np.ones((3, 3, 3), bool), iterations=2)
    labels, n = ndimage.label(bridged)
    if n == 0:
        return None
    labels = np.where(crop, labels, 0)
    sizes = np.bincount(labels.ravel())
    d = (target - entry) / np.linalg.norm(target - entry)
    best = None
    objects = ndimage.find_objects(labels)
    for lab in np.argsort(sizes[1:])[::-1][:50] + 1:
        if sizes[lab] < 3:
            break
        sl = objects[lab - 1]
        kji = np.argwhere(labels[sl] == lab) + [s.start for s in sl] + lo
        pts = ct.kji_to_ras_points(kji)
        c, a, ev = _weighted_pca(pts, np.ones(len(pts)))
        _, t = _dist_to_line(pts, c, a)
        length = float(t.max() - t.min())
        if length < min_length or ev[1] > 0.05 * ev[0]:
            continue
        rel = pts - entry
        s = rel @ d
        dist = float(np.min(np.linalg.norm(rel - np.outer(s, d), axis=1)))
        if best is None or dist < best:
            best = dist
    return best

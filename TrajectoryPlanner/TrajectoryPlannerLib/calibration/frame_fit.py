"""Robot-to-CT calibration: find the robot's fiducial frame in the planning CT and fit its model, no clicking.

Pipeline (CT in HU on its RasVolume grid; every point RAS mm; the result maps robot-frame points to CT RAS):

1. Candidates. Voxels brighter than halfway between air and the model's nominal CT number, outside the
   patient (the body is the largest connected region above -300 HU on a coarse grid, holes filled), found
   first on a sparse sampling finer than the smallest fiducial and then read at full resolution only in
   boxes around them (metal, brighter than any fiducial, is left out).
   Connected groups whose peak is outside the model's ``ct_intensity_hu`` range are dropped (table, metal).
2. Fiducials. Tubes: straight segments extracted one by one by RANSAC (a frame's tubes touch at its
   corners, so one connected group can hold several tubes); each segment becomes points on its axis
   (intensity-weighted centroids of 1-2 mm slabs across the tube), sub-voxel by construction. Spheres:
   connected groups of the sphere's volume, their weighted centroids.
3. Pose hypotheses. Tubes: every pair of non-parallel detected segments against every model pair with the
   same angle gives a rigid pose (directions align, the common perpendiculars' midpoints coincide).
   Spheres: every triangle of detected centres against model triangles with the same side lengths (Kabsch).
   Each hypothesis is scored by how many detected fiducials it explains one-to-one.
4. Refinement: least squares of axis points to their model tube axes (or centres to centres), with
   outlier trimming; per-fiducial residuals; the pose covariance from the residuals and Jacobian.
5. Refusals (one sentence each): too few fiducials, all tubes parallel, a partial frame (a fiducial not found
   or less than ``min_coverage`` of a tube in the scan), two different poses explaining the data equally
   well (ambiguous), residuals above the QA limit.

Predicted error at a target: the pose covariance propagated to the target, as a 95th percentile, plus the
model's manufacturing tolerance. The QA passes only when every check holds.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from SmartBiopsyCoreLib.fiducial_frames.model import FrameModel
from SmartBiopsyCoreLib.geometry import RasVolume
from SmartBiopsyCoreLib.progress import check_cancel, report
from TrajectoryPlannerLib.errors import TrajectoryPlannerError

logger = logging.getLogger(__name__)

BODY_HU = -300.0          # patient vs air on the coarse body grid
COARSE_MM = 4.0           # coarse grid for the body mask
PARALLEL_DEG = 8.0        # two tubes closer than this are treated as parallel
ANGLE_TOL_DEG = 6.0       # a detected tube pair matches a model pair when their angles agree this well
INLIER_MM = 1.5           # a detected axis point explains a model tube when this close (hypothesis scoring)
GAP_TOL_MM = 3.0          # a detected tube pair matches a model pair when their lines' shortest distances agree


class CalibrationError(TrajectoryPlannerError):
    """The fiducial frame cannot be found or fitted unambiguously (the message says why)."""


@dataclass
class Fiducial:
    """One detected fiducial: a tube (axis points, direction) or a sphere (centre)."""

    kind: str
    points: np.ndarray            # tube: axis points (N, 3); sphere: (1, 3) centre
    direction: np.ndarray | None  # tube axis (unit), None for a sphere
    length_mm: float
    radius_mm: float
    peak_hu: float
    ends: np.ndarray | None = None  # tube: the two ends of its imaged voxels along the axis (2, 3)

    @property
    def centre(self) -> np.ndarray:
        return self.points.mean(0)


@dataclass
class CalibrationThresholds:
    max_residual_mm: float = 0.6      # RMS of a fiducial's axis points (or centre) to its fitted model
    min_coverage: float = 0.6         # fraction of each model tube that must be in the scan
    max_target_error_mm: float = 1.5  # predicted 95th-percentile error at each target
    ambiguity_mm: float = 3.0         # a second pose farther than this at the frame but as good -> refusal

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CalibrationResult:
    """A fitted frame: robot->CT RAS pose, per-fiducial residuals and coverage, predicted target errors, QA."""

    model: FrameModel
    matrix_robot_to_ct_ras: np.ndarray
    residuals_mm: dict
    coverage: dict
    n_points: int
    rms_mm: float
    pose_covariance: np.ndarray = field(repr=False)
    centre_ras: np.ndarray = field(repr=False)
    target_errors: dict = field(default_factory=dict)
    thresholds: CalibrationThresholds = field(default_factory=CalibrationThresholds)
    checks: dict = field(default_factory=dict)
    ct_name: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(bool(c["passed"]) for c in self.checks.values())

    def predicted_error_p95_mm(self, target_ras) -> float:
        """95th-percentile error (mm) of a target's position through this calibration."""
        return predicted_target_error(self, target_ras)

    def qa_dict(self) -> dict:
        return {
            "passed": self.passed,
            "model": self.model.name,
            "fiducials_found": f"{len(self.residuals_mm)} of {len(self.model.tubes or self.model.spheres)}",
            "residual_rms_mm": round(self.rms_mm, 4),
            "residual_mm_per_fiducial": {k: round(v, 4) for k, v in self.residuals_mm.items()},
            "coverage_per_tube": {k: round(v, 3) for k, v in self.coverage.items()},
            "axis_points": self.n_points,
            "predicted_error_p95_mm_at_targets": {k: round(v, 3) for k, v in self.target_errors.items()},
            "thresholds": self.thresholds.to_dict(),
            "checks": self.checks,
            "ct": self.ct_name,
        }

    def to_dict(self) -> dict:
        """The ``smartbiopsy.robot_calibration/1`` document (robot frame -> CT RAS, mm) with its QA."""
        return {"schema": "smartbiopsy.robot_calibration/1", "from_frame": "ROBOT", "to_frame": "CT",
                "space": "RAS", "units": "mm",
                "matrix_robot_to_ct_ras": np.round(self.matrix_robot_to_ct_ras, 9).tolist(),
                "qa": self.qa_dict(),
                "source": f"fiducial frame {self.model.name} fitted in {self.ct_name or 'the planning CT'}"}


# ================================================================================ small geometry
def _rotvec_matrix(w: np.ndarray) -> np.ndarray:
    th = float(np.linalg.norm(w))
    if th < 1e-12:
        return np.eye(3)
    k = w / th
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * kx + (1 - math.cos(th)) * (kx @ kx)


def _cross(a, b) -> np.ndarray:
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _frame(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Orthonormal frame (columns) from a direction u and a second, non-parallel direction v."""
    a = u / math.sqrt(float(u @ u))
    w = _cross(a, v)
    w = w / math.sqrt(float(w @ w))
    return np.stack([a, w, _cross(a, w)], 1)


def _closest_midpoint(p1, d1, p2, d2) -> np.ndarray:
    """Midpoint of the common perpendicular of two non-parallel lines."""
    r = p1 - p2
    a, b, c = d1 @ d1, d1 @ d2, d2 @ d2
    d, e = d1 @ r, d2 @ r
    den = a * c - b * b
    s = (b * e - c * d) / den
    t = (a * e - b * d) / den
    return 0.5 * ((p1 + s * d1) + (p2 + t * d2))


def _seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of points p (..., 3) to segments a->b (broadcast)."""
    ab = b - a
    t = np.clip(np.sum((p - a) * ab, -1) / np.sum(ab * ab, -1), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def _line_dist(p: np.ndarray, a: np.ndarray, d: np.ndarray) -> np.ndarray:
    q = p - a
    return np.linalg.norm(q - (q @ d)[:, None] * d, axis=1)


# ================================================================================ 1. candidates
def _candidate_voxels(ct: RasVolume, model: FrameModel):
    """(kji indices (N, 3), HU (N,), threshold) of bright voxels outside the patient whose connected region has
    a peak in the model's range.

    Reads the full grid only at two sparse samplings (the body on a ~4 mm grid; candidates on a grid finer than
    the smallest fiducial, so none can fall between samples) and then only the boxes around candidates at full
    resolution, so the cost hardly depends on the pixel size.
    """
    thr = 0.5 * (model.hu_nominal + (-1000.0))
    sp = ct.spacing[::-1]  # k, j, i
    step = tuple(int(v) for v in np.maximum(np.round(COARSE_MM / sp).astype(int), 1))
    # the body from a sparse sample of the grid, opened so that thin bright things outside it (the frame's
    # tubes, streak artefacts) neither join it nor connect the frame to it
    sample = ct.array[::step[0], ::step[1], ::step[2]] > BODY_HU
    lab, n = ndimage.label(ndimage.binary_opening(sample, iterations=1))
    if n:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        body = ndimage.binary_dilation(ndimage.binary_fill_holes(lab == int(np.argmax(sizes))), iterations=1)
    else:
        body = np.zeros(sample.shape, bool)
    # candidates on a grid whose pitch is 0.7 of the smallest fiducial's diameter
    r_min = min(f.radius_mm for f in (model.tubes or model.spheres))
    cstep = tuple(int(v) for v in np.maximum(np.floor(1.4 * r_min / sp).astype(int), 1))
    cs = ct.array[::cstep[0], ::cstep[1], ::cstep[2]]
    ck, cj, ci = (np.arange(n_) * s_ // b_ for n_, s_, b_ in zip(cs.shape, cstep, step))
    in_body = body[np.ix_(np.minimum(ck, body.shape[0] - 1), np.minimum(cj, body.shape[1] - 1),
                          np.minimum(ci, body.shape[2] - 1))]
    cand = (cs >= thr) & ~in_body
    clab, cn = ndimage.label(ndimage.binary_dilation(cand, iterations=1), structure=np.ones((3, 3, 3), bool))
    # a region none of whose samples comes near a fiducial's CT number is the table or a streak: not read
    cpeak = ndimage.maximum(np.where(cand, cs, -1024), clab, index=np.arange(1, cn + 1)) if cn else []
    coarse_peak_min = thr + 0.6 * (model.hu_min - thr)
    shape = np.array(ct.shape_kji)
    boxes = []
    for n_c, sl in enumerate(ndimage.find_objects(clab)):
        if sl is None or cpeak[n_c] < coarse_peak_min:
            continue
        lo = np.maximum((np.array([s.start for s in sl]) - 1) * cstep, 0)
        hi = np.minimum((np.array([s.stop for s in sl]) + 1) * cstep, shape)
        boxes.append((lo, hi))
    kjis, valss = [], []
    for lo, hi in boxes:
        sub = ct.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        # metal (brighter than any fiducial) is not a candidate, so its streaks cannot join it to the frame
        idx = np.nonzero((sub >= thr) & (sub <= model.hu_max))
        if idx[0].size == 0:
            continue
        kji = np.stack(idx, 1) + lo
        inside = body[np.minimum(kji[:, 0] // step[0], body.shape[0] - 1), np.minimum(kji[:, 1] // step[1], body.shape[1] - 1),
                      np.minimum(kji[:, 2] // step[2], body.shape[2] - 1)]
        kjis.append(kji[~inside])
        valss.append(sub[idx][~inside].astype(np.float32))
    if not kjis or sum(len(k) for k in kjis) == 0:
        return np.zeros((0, 3), int), np.zeros(0, np.float32), thr
    kji = np.unique(np.concatenate(kjis), axis=0, return_index=True)
    vals = np.concatenate(valss)[kji[1]]
    kji = kji[0]
    lo = kji.min(0)
    sub = np.zeros(kji.max(0) + 1 - lo, bool)
    sub[tuple((kji - lo).T)] = True
    lab, n = ndimage.label(sub, structure=np.ones((3, 3, 3), bool))
    labels = lab[tuple((kji - lo).T)]
    peak = ndimage.maximum(vals, labels, index=np.arange(1, n + 1))
    count = np.bincount(labels, minlength=n + 1)[1:]
    # a fiducial's peak reaches the model's range (the table and streaks stay fainter); a speck is noise
    ok_labels = np.nonzero((peak >= model.hu_min) & (count >= 4))[0] + 1
    keep = np.isin(labels, ok_labels)
    return kji[keep], vals[keep], thr


# ================================================================================ 2. fiducials
def _axis_points(pts: np.ndarray, w: np.ndarray, origin: np.ndarray, d: np.ndarray, bin_mm: float) -> np.ndarray:
    s = (pts - origin) @ d
    b = np.floor((s - s.min()) / bin_mm).astype(int)
    nb = int(b.max()) + 1
    sw = np.bincount(b, weights=w, minlength=nb)
    cnt = np.bincount(b, minlength=nb)
    good = (cnt >= 3) & (sw > 0)
    cen = np.stack([np.bincount(b, weights=w * pts[:, q], minlength=nb) for q in range(3)], 1)
    cen = cen[good] / sw[good][:, None]
    if len(cen) > 4:
        cen = cen[1:-1]  # end slabs hold a partial cross-section
    return cen


def _extract_tubes(pts: np.ndarray, w: np.ndarray, model: FrameModel, spacing: np.ndarray, rng) -> list[Fiducial]:
    r_model = float(np.median([t.radius_mm for t in model.tubes]))
    vox = float(np.max(spacing))
    tol = r_model + 0.75 * vox
    min_len = max(12.0, 0.25 * min(t.length_mm for t in model.tubes))
    bin_mm = max(1.0, float(spacing[2]))
    remaining = np.arange(len(pts))
    out = []
    for _ in range(3 * len(model.tubes)):
        if len(remaining) < 20:
            break
        cand = remaining if len(remaining) <= 1500 else rng.choice(remaining, 1500, replace=False)
        P = pts[cand]
        # 200 two-point line hypotheses scored at once against the sample
        ij = rng.integers(0, len(P), (200, 2))
        d = P[ij[:, 1]] - P[ij[:, 0]]
        n = np.linalg.norm(d, axis=1)
        ok = n >= min_len / 2
        if not ok.any():
            break
        a0, d = P[ij[ok, 0]], d[ok] / n[ok, None]
        q = P[None, :, :] - a0[:, None, :]                           # (hyp, points, 3)
        along = np.einsum("hpk,hk->hp", q, d)
        dist2 = np.einsum("hpk,hpk->hp", q, q) - along ** 2
        counts = (dist2 <= tol * tol).sum(1)
        h = int(np.argmax(counts))
        best_n, best = int(counts[h]), (a0[h], d[h])
        if best_n < 20:
            break
        # refine on all remaining points: PCA of inliers, twice
        a, d = best
        for _it in range(2):
            inl = remaining[_line_dist(pts[remaining], a, d) <= tol]
            q = pts[inl]
            ww = w[inl]
            a = np.average(q, axis=0, weights=ww)
            cov = np.cov((q - a).T, aweights=ww)
            d = np.linalg.eigh(cov)[1][:, -1]
        s = (pts[inl] - a) @ d
        order = np.argsort(s)
        gaps = np.nonzero(np.diff(s[order]) > max(3.0, 2.5 * vox))[0]
        runs = np.split(order, gaps + 1)
        run = max(runs, key=len)
        seg = inl[run]
        length = float(np.ptp(s[run]))
        ends = np.array([a + s[run].min() * d, a + s[run].max() * d])
        remaining = np.setdiff1d(remaining, seg, assume_unique=True)
        if length < min_len or len(seg) < 20:
            continue
        q, ww = pts[seg], w[seg]
        a = np.average(q, axis=0, weights=ww)
        axis_pts = _axis_points(q, ww, a, d, bin_mm)
        if len(axis_pts) < 4:
            continue
        # radius from the transverse spread of the voxels (uniform disk: E[rho^2] = r^2 / 2)
        rho2 = _line_dist(q, a, d) ** 2
        radius = math.sqrt(2.0 * float(np.average(rho2, weights=ww)))
        if not (0.4 * r_model <= radius <= 2.0 * r_model + vox):
            continue
        out.append(Fiducial("tube", axis_pts, d, length, radius, float(ww.max()), ends))
    return out


def _extract_spheres(ct: RasVolume, kji: np.ndarray, vals: np.ndarray, thr: float, model: FrameModel) -> list[Fiducial]:
    r_model = float(np.median([s.radius_mm for s in model.spheres]))
    lo = kji.min(0)
    sub = np.zeros(kji.max(0) + 1 - lo, bool)
    sub[tuple((kji - lo).T)] = True
    lab, n = ndimage.label(sub, structure=np.ones((3, 3, 3), bool))
    labels = lab[tuple((kji - lo).T)]
    pts = ct.kji_to_ras_points(kji.astype(float))
    w = np.clip(vals - thr, 0, None) + 1e-3
    out = []
    for L in range(1, n + 1):
        m = labels == L
        vol = m.sum() * ct.voxel_volume_mm3
        r_eq = (3 * vol / (4 * math.pi)) ** (1 / 3)
        if not (0.5 * r_model <= r_eq <= 1.6 * r_model):
            continue
        c = np.average(pts[m], axis=0, weights=w[m])
        out.append(Fiducial("sphere", c[None], None, 0.0, r_eq, float(vals[m].max())))
    return out


def _partial_volume_axis(ct: RasVolume, tube: Fiducial, radius_mm: float) -> np.ndarray:
    """Axis points of a detected tube from every voxel around it, weighted by its partial volume (HU above air).

    The tube's image is the cylinder blurred by the pixel and the slice profile, both symmetric about the axis,
    so centroids over a slab across the tube that include the partial-volume rim (rather than only voxels above
    a threshold) stay on the axis even for tubes oblique to thick slices.
    """
    sp = ct.spacing
    reach = radius_mm + 1.5 * float(np.max(sp))
    a = tube.points[0]
    d = tube.direction
    s_all = (tube.points - a) @ d
    p0, p1 = a + s_all.min() * d, a + s_all.max() * d
    # voxels within reach of the axis: small index cubes marched along it (not the segment's whole bounding box)
    steps = np.linspace(0.0, 1.0, max(int(np.ceil(np.linalg.norm(p1 - p0) / reach)) + 1, 2))
    centres = np.rint(ct.ras_to_ijk_points(p0 + steps[:, None] * (p1 - p0))).astype(int)  # (i, j, k)
    half = np.ceil(reach / sp).astype(int) + 1
    offs = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), -1).reshape(-1, 3)
    cand = (centres[:, None, :] + offs[None]).reshape(-1, 3)
    shape_ijk = np.array(ct.shape_kji)[::-1]
    cand = cand[np.all((cand >= 0) & (cand < shape_ijk), axis=1)]
    flat = np.unique(np.ravel_multi_index((cand[:, 2], cand[:, 1], cand[:, 0]), ct.shape_kji))
    kk, jj, ii = np.unravel_index(flat, ct.shape_kji)
    cand = np.stack([ii, jj, kk], 1)
    sub = ct.array[cand[:, 2], cand[:, 1], cand[:, 0]].astype(np.float32)
    pts = ct.ijk_to_ras_points(cand.astype(float))
    w = np.clip(sub.ravel() + 1000.0, 0.0, None)
    s = (pts - a) @ d
    # keep clear of the ends, where a frame's tubes meet and the neighbour's voxels fall in the same cylinder
    near = (_line_dist(pts, a, d) <= reach) & (s >= s_all.min() + reach) & (s <= s_all.max() - reach) & (w > 0)
    if near.sum() < 20:
        return tube.points
    bin_mm = max(2.0, 2.0 * float(sp[2]))
    pts_axis = _axis_points(pts[near], w[near], a, d, bin_mm)
    return pts_axis if len(pts_axis) >= 3 else tube.points


# ================================================================================ 3. hypotheses
def _line_gaps(points, dirs: np.ndarray) -> np.ndarray:
    """Shortest distance between every pair of infinite lines (point, unit direction); parallel pairs: inf."""
    n = len(dirs)
    out = np.full((n, n), np.inf)
    for i in range(n):
        for j in range(n):
            c = _cross(dirs[i], dirs[j])
            nc = math.sqrt(float(c @ c))
            if nc > 1e-6:
                out[i, j] = abs(float((np.asarray(points[j]) - np.asarray(points[i])) @ c)) / nc
    return out


def _tube_hypotheses(det: list[Fiducial], model: FrameModel):
    mt = model.tubes
    mdir = np.array([t.direction for t in mt])
    model_gap = _line_gaps([t.start for t in mt], mdir)
    det_gap = _line_gaps([f.centre for f in det], np.array([f.direction for f in det]))
    hyps = []
    cos_par = math.cos(math.radians(PARALLEL_DEG))
    for i, j in itertools.combinations(range(len(det)), 2):
        di, dj = det[i].direction, det[j].direction
        if abs(di @ dj) > cos_par:
            continue
        ang_det = math.degrees(math.acos(min(1.0, abs(di @ dj))))
        for a, b in itertools.permutations(range(len(mt)), 2):
            cab = mdir[a] @ mdir[b]
            if abs(cab) > cos_par:
                continue
            if abs(math.degrees(math.acos(min(1.0, abs(cab)))) - ang_det) > ANGLE_TOL_DEG:
                continue
            if abs(model_gap[a, b] - det_gap[i, j]) > GAP_TOL_MM:
                continue  # the two lines' shortest distance differs: not this pair of model tubes
            for s in (1.0, -1.0):
                u = s * di
                v = dj if (u @ dj) * cab >= 0 else -dj
                R = _frame(u, v) @ _frame(mdir[a], mdir[b]).T
                mm = _closest_midpoint(mt[a].start, mdir[a], mt[b].start, mdir[b])
                md = _closest_midpoint(det[i].centre, di, det[j].centre, dj)
                hyps.append((R, md - R @ mm))
    return hyps


def _sphere_hypotheses(det: list[Fiducial], model: FrameModel, tol_mm: float = 2.5):
    mc = np.array([s.centre for s in model.spheres])
    dc = np.array([f.centre for f in det])
    hyps = []
    for tri in itertools.combinations(range(len(dc)), 3):
        dd = [np.linalg.norm(dc[tri[0]] - dc[tri[1]]), np.linalg.norm(dc[tri[1]] - dc[tri[2]]),
              np.linalg.norm(dc[tri[0]] - dc[tri[2]])]
        if min(dd) < 5.0:
            continue
        for mtri in itertools.permutations(range(len(mc)), 3):
            md = [np.linalg.norm(mc[mtri[0]] - mc[mtri[1]]), np.linalg.norm(mc[mtri[1]] - mc[mtri[2]]),
                  np.linalg.norm(mc[mtri[0]] - mc[mtri[2]])]
            if max(abs(x - y) for x, y in zip(dd, md)) > tol_mm:
                continue
            R, t = _kabsch(mc[list(mtri)], dc[list(tri)])
            hyps.append((R, t))
    return hyps


def _kabsch(src: np.ndarray, dst: np.ndarray):
    cs, cd = src.mean(0), dst.mean(0)
    h = (src - cs).T @ (dst - cd)
    u, _, vt = np.linalg.svd(h)
    dfix = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])
    R = vt.T @ dfix @ u.T
    return R, cd - R @ cs


def _assign(R, t, det: list[Fiducial], model: FrameModel, tol: float):
    """One-to-one assignment detected -> model fiducial under pose (R, t): {det index: (model index, rms)}."""
    if model.tubes:
        a = np.array([x.start for x in model.tubes]) @ R.T + t
        b = np.array([x.end for x in model.tubes]) @ R.T + t
        pts = np.concatenate([f.points for f in det])
        owner = np.repeat(np.arange(len(det)), [len(f.points) for f in det])
        d2 = _seg_dist(pts[:, None, :], a[None], b[None]) ** 2            # (points, tubes)
        cost = np.sqrt(np.stack([np.bincount(owner, weights=d2[:, m], minlength=len(det)) for m in range(len(a))], 1)
                       / np.bincount(owner, minlength=len(det))[:, None])
    else:
        c = np.array([s.centre for s in model.spheres]) @ R.T + t
        cost = np.linalg.norm(np.array([f.centre for f in det])[:, None, :] - c[None], axis=-1)
    pairs = {}
    used = set()
    for flat in np.argsort(cost, axis=None):
        i, m = np.unravel_index(flat, cost.shape)
        if cost[i, m] > tol:
            break
        if i in pairs or m in used:
            continue
        pairs[int(i)] = (int(m), float(cost[i, m]))
        used.add(int(m))
    return pairs


# ================================================================================ 4. refinement
def _refine(R0, t0, det, model, pairs, trim_mm: float):
    """Least squares of axis points to model axes (tubes) or centres to centres (spheres)."""
    from scipy.optimize import least_squares

    c0 = np.mean([det[i].centre for i in pairs], axis=0)
    if model.tubes:
        P = np.concatenate([det[i].points for i in pairs])
        M = np.concatenate([[m] * len(det[i].points) for i, (m, _) in pairs.items()])
        A = np.array([model.tubes[m].start for m in M])
        D = np.array([model.tubes[m].direction for m in M])
    else:
        P = np.array([det[i].centre for i in pairs])
        M = np.array([m for m, _ in pairs.values()])
        A = np.array([model.spheres[m].centre for m in M])
        D = None
    keep = np.ones(len(P), bool)

    def pose(x):
        # a rotation about c0 (CT RAS) and a translation applied after (R0, t0): p' = Rd (R0 q + t0 - c0) + c0 + dt
        rd = _rotvec_matrix(x[:3])
        return rd @ R0, rd @ (t0 - c0) + c0 + x[3:]

    def resid(x, sel):
        R, t = pose(x)
        # robot points -> CT; residual vector from the CT point to its model axis, perpendicular components
        a = A[sel] @ R.T + t
        if D is None:
            return (P[sel] - a).ravel()
        d = D[sel] @ R.T
        q = P[sel] - a
        perp = q - np.sum(q * d, 1)[:, None] * d
        return perp.ravel()

    x = np.zeros(6)
    for _ in range(3):
        sol = least_squares(resid, x, args=(keep,), method="lm" if keep.sum() * 3 > 6 else "trf")
        x = sol.x
        r = resid(x, np.ones(len(P), bool)).reshape(len(P), 3)
        dist = np.linalg.norm(r, axis=1)
        new_keep = dist <= max(trim_mm, 3.0 * 1.4826 * float(np.median(dist)) + 1e-6)
        if new_keep.sum() < max(6, 0.6 * len(P)) or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    R, t = pose(x)
    r_all = resid(x, np.ones(len(P), bool)).reshape(len(P), 3)
    dist = np.linalg.norm(r_all, axis=1)
    # covariance of the 6 parameters (rotation about c0, translation) from the kept residuals
    J = sol.jac
    dof = max((2 if D is not None else 3) * int(keep.sum()) - 6, 1)  # a point-to-axis residual has 2 DOF
    sigma2 = float(np.sum(sol.fun ** 2)) / dof
    try:
        cov = sigma2 * np.linalg.inv(J.T @ J)
    except np.linalg.LinAlgError:
        cov = np.full((6, 6), np.inf)
    per = {}
    for i, (m, _) in pairs.items():
        sel = M == m
        per[m] = float(np.sqrt(np.mean(dist[sel] ** 2)))
    return R, t, per, float(np.sqrt(np.mean(dist[keep] ** 2))), int(keep.sum()), cov, c0


def _coverage(R, t, det, model, pairs, vox: float) -> dict:
    out = {}
    for i, (m, _) in pairs.items():
        tube = model.tubes[m]
        a = R @ tube.start + t
        d = R @ tube.direction
        ends = det[i].ends if det[i].ends is not None else det[i].points
        s = (ends - a) @ d
        lo, hi = max(float(s.min()), 0.0), min(float(s.max()), tube.length_mm)
        # voxel centres stop up to one voxel short of each flat end of a fully imaged tube
        out[tube.name] = float(np.clip((hi - lo + 2.0 * vox) / tube.length_mm, 0.0, 1.0))
    return out


def _pose_distance(Ra, ta, Rb, tb, model: FrameModel) -> float:
    pts = np.array([x.start for x in model.tubes] + [x.end for x in model.tubes]) if model.tubes else \
        np.array([s.centre for s in model.spheres])
    return float(np.max(np.linalg.norm((pts @ Ra.T + ta) - (pts @ Rb.T + tb), axis=1)))


# ================================================================================ 5. entry point
def predicted_target_error(result: CalibrationResult, target_ras, samples: int = 4000, seed: int = 0) -> float:
    """95th percentile (mm) of a target's position error through the fitted pose plus the model tolerance."""
    p = np.asarray(target_ras, float)
    cov = result.pose_covariance
    if not np.all(np.isfinite(cov)):
        return float("inf")
    rng = np.random.default_rng(seed)
    x = rng.multivariate_normal(np.zeros(6), cov, size=samples, method="eigh")
    c = result.centre_ras
    # Rodrigues for every sample at once: R v = v cos th + (k x v) sin th + k (k.v)(1 - cos th)
    v = p - c
    th = np.linalg.norm(x[:, :3], axis=1)
    k = np.divide(x[:, :3], th[:, None], out=np.zeros_like(x[:, :3]), where=th[:, None] > 1e-15)
    rv = (v[None] * np.cos(th)[:, None] + np.cross(k, v[None]) * np.sin(th)[:, None]
          + k * (k @ v)[:, None] * (1 - np.cos(th))[:, None])
    errs = np.linalg.norm(rv + x[:, 3:] - v[None], axis=1)
    fit95 = float(np.percentile(errs, 95))
    return float(math.hypot(fit95, 2.0 * result.model.tolerance_mm))


def calibrate_from_ct(ct: RasVolume, model: FrameModel, targets_ras: dict | None = None,
                      thresholds: CalibrationThresholds | None = None, *, progress=None, should_cancel=None,
                      seed: int = 0) -> CalibrationResult:
    """Find ``model`` in ``ct`` and fit it; returns the result with its QA or raises CalibrationError.

    ``targets_ras``: {name: RAS point} at which the predicted error is reported and checked. The returned
    matrix maps robot-frame points to CT RAS (mm). Raises :class:`CalibrationError` (one sentence) when the
    frame is missing, partial, degenerate or ambiguous; a frame that is found but fails a QA limit is
    returned with ``passed`` False and the failing check named. The same as :func:`fit_frame` followed by
    :func:`check_calibration` (a run that fits the frame before its targets are planned calls them apart).
    """
    result = fit_frame(ct, model, thresholds, progress=progress, should_cancel=should_cancel, seed=seed)
    return check_calibration(result, targets_ras, progress=progress)


def fit_frame(ct: RasVolume, model: FrameModel, thresholds: CalibrationThresholds | None = None, *, progress=None,
              should_cancel=None, seed: int = 0) -> CalibrationResult:
    """The fitted frame of :func:`calibrate_from_ct` before its QA (no target errors, no checks: ``passed`` is
    False until :func:`check_calibration`). Raises :class:`CalibrationError` as :func:`calibrate_from_ct` does."""
    th = thresholds or CalibrationThresholds()
    if model_symmetries(model):
        raise CalibrationError(f"the {model.name} frame model is symmetric (a rotation maps it onto itself), so its "
                               "pose cannot be told from the image alone; use an asymmetric frame model")
    rng = np.random.default_rng(seed)
    n_model = len(model.tubes or model.spheres)
    kind = "tubes" if model.tubes else "spheres"
    report(progress, 0.05, "finding bright structures outside the patient")
    kji, vals, thr = _candidate_voxels(ct, model)
    check_cancel(should_cancel, "the robot calibration")
    if len(kji) == 0:
        raise CalibrationError(f"no {model.name} frame found in the CT: nothing outside the patient is as bright as "
                               f"its {kind} ({model.hu_min:.0f}-{model.hu_max:.0f} HU); scan the frame with the patient")
    report(progress, 0.25, f"extracting {kind}")
    if model.tubes:
        pts = ct.kji_to_ras_points(kji.astype(float))
        det = _extract_tubes(pts, np.clip(vals - thr, 0, None) + 1e-3, model, ct.spacing, rng)
        r_model = float(np.median([tb.radius_mm for tb in model.tubes]))
        for f in det:
            f.points = _partial_volume_axis(ct, f, r_model)
    else:
        det = _extract_spheres(ct, kji, vals, thr, model)
    check_cancel(should_cancel, "the robot calibration")
    if model.tubes:
        dirs = np.array([f.direction for f in det]) if det else np.zeros((0, 3))
        nonpar = any(abs(dirs[i] @ dirs[j]) < math.cos(math.radians(PARALLEL_DEG))
                     for i, j in itertools.combinations(range(len(dirs)), 2))
        if len(det) < 2:
            raise CalibrationError(f"only {len(det)} tube(s) of the {model.name} frame found in the CT ({n_model} "
                                   "expected); the whole frame must be in the scan")
        if not nonpar:
            raise CalibrationError(f"the {len(det)} tubes found in the CT are all parallel; the frame's pose along "
                                   "them cannot be determined (is the frame partly outside the scan?)")
        hyps = _tube_hypotheses(det, model)
    else:
        if len(det) < 3:
            raise CalibrationError(f"only {len(det)} sphere(s) of the {model.name} frame found in the CT "
                                   f"({n_model} expected); the whole frame must be in the scan")
        hyps = _sphere_hypotheses(det, model)
    if not hyps:
        raise CalibrationError(f"the structures found in the CT do not match the {model.name} frame's geometry; "
                               "check the frame model")
    report(progress, 0.45, f"scoring {len(hyps)} pose hypotheses")
    scored = []
    for R, t in hyps:
        pairs = _assign(R, t, det, model, INLIER_MM if model.tubes else 2.0)
        if not pairs:
            continue
        score = len(pairs) - 0.01 * sum(c for _, c in pairs.values())
        scored.append((score, R, t, pairs))
    scored.sort(key=lambda s: -s[0])
    check_cancel(should_cancel, "the robot calibration")
    report(progress, 0.65, "refining the best poses")
    refined = []
    for score, R, t, pairs in scored[:8]:
        if len(pairs) < 2:
            continue
        R2, t2, per, rms, npts, cov, c0 = _refine(R, t, det, model, pairs, trim_mm=2.0)
        pairs2 = _assign(R2, t2, det, model, INLIER_MM if model.tubes else 2.0)
        if len(pairs2) > len(pairs):
            R2, t2, per, rms, npts, cov, c0 = _refine(R2, t2, det, model, pairs2, trim_mm=2.0)
            pairs = pairs2
        if any(_pose_distance(R2, t2, r[0], r[1], model) < 0.5 for r in refined):
            continue
        refined.append((R2, t2, per, rms, npts, cov, c0, pairs))
    if not refined:
        raise CalibrationError(f"no pose of the {model.name} frame explains the structures found in the CT")
    refined.sort(key=lambda r: (-len(r[7]), r[3]))
    R, t, per, rms, npts, cov, c0, pairs = refined[0]
    if len(pairs) < 2:
        raise CalibrationError(f"too few fiducials of the {model.name} frame matched to fit its pose")
    # ambiguity: another pose explaining as many fiducials about as well
    for other in refined[1:]:
        if len(other[7]) == len(pairs) and other[3] <= 1.5 * rms + 0.05 and \
                _pose_distance(R, t, other[0], other[1], model) > th.ambiguity_mm:
            raise CalibrationError(f"the {model.name} frame fits the CT in two different poses equally well "
                                   f"({_pose_distance(R, t, other[0], other[1], model):.1f} mm apart); the frame "
                                   "is ambiguous in this scan - rescan with the whole frame in view")
    names = [f.name for f in (model.tubes or model.spheres)]
    found = {names[m] for m, _ in pairs.values()}
    missing = [n for n in names if n not in found]
    if missing:
        raise CalibrationError(f"partial {model.name} frame: {len(found)} of {n_model} {kind} found (missing "
                               f"{', '.join(missing)}); the whole frame must be in the scan")
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = R, t
    residuals = {names[mi]: v for mi, v in per.items()}
    coverage = _coverage(R, t, det, model, pairs, float(np.max(ct.spacing))) if model.tubes else {}
    result = CalibrationResult(model=model, matrix_robot_to_ct_ras=m, residuals_mm=residuals, coverage=coverage,
                               n_points=npts, rms_mm=rms, pose_covariance=cov, centre_ras=c0, thresholds=th,
                               ct_name=str(getattr(ct, "name", "")))
    low = {k: v for k, v in coverage.items() if v < th.min_coverage}
    if low:
        raise CalibrationError(f"partial {model.name} frame: tube(s) {', '.join(sorted(low))} only "
                               f"{100 * min(low.values()):.0f} % in the scan (at least {100 * th.min_coverage:.0f} % "
                               "needed); the whole frame must be in the scan")
    return result


def check_calibration(result: CalibrationResult, targets_ras: dict | None = None, *, progress=None) -> CalibrationResult:
    """The QA of a frame fitted by :func:`fit_frame`: predicted error at each of ``targets_ras`` ({name: RAS
    point}) and the checks (every fiducial found, residual, coverage, target error); returns ``result``."""
    model, th, residuals, coverage = result.model, result.thresholds, result.residuals_mm, result.coverage
    n_model = len(model.tubes or model.spheres)
    n_found = len({f.name for f in (model.tubes or model.spheres)})  # fit_frame raises when one is missing
    kind = "tubes" if model.tubes else "spheres"
    report(progress, 0.85, "predicted error at the targets")
    result.target_errors = {}
    for name, p in (targets_ras or {}).items():
        result.target_errors[str(name)] = predicted_target_error(result, p)
    worst_fid = max(residuals.values())
    result.checks = {
        "all_fiducials_found": {"passed": True, "value": f"{n_found} of {n_model}"},
        "residual": {"passed": bool(worst_fid <= th.max_residual_mm), "value_mm": round(worst_fid, 4),
                     "limit_mm": th.max_residual_mm},
        "coverage": {"passed": True, "value": round(min(coverage.values()), 3) if coverage else None,
                     "limit": th.min_coverage},
        "target_error": {"passed": bool(result.target_errors) and
                         all(v <= th.max_target_error_mm for v in result.target_errors.values()),
                         "value_mm": round(max(result.target_errors.values()), 3) if result.target_errors else None,
                         "limit_mm": th.max_target_error_mm,
                         **({} if result.target_errors else {"reason": "no target given"})},
    }
    report(progress, 1.0, "calibration " + ("passed" if result.passed else "failed QA"))
    logger.info("robot calibration %s: %d/%d %s, residual RMS %.3f mm, QA %s", model.name, n_found, n_model, kind,
                result.rms_mm, "passed" if result.passed else "failed")
    return result


_SYMMETRY_CACHE: dict = {}


def model_symmetries(model: FrameModel, tol_mm: float = 1.0) -> list[np.ndarray]:
    """Rigid motions other than the identity that map the model's fiducials onto themselves (4x4, robot frame).

    A frame with such a symmetry cannot be calibrated from its image alone: two poses fit equally well.
    """
    from SmartBiopsyCoreLib.dataio import jsonio

    key = (jsonio.dumps(model.to_dict(), sort_keys=True), tol_mm)
    if key not in _SYMMETRY_CACHE:
        _SYMMETRY_CACHE[key] = _model_symmetries(model, tol_mm)
    return _SYMMETRY_CACHE[key]


def _model_symmetries(model: FrameModel, tol_mm: float) -> list[np.ndarray]:
    if model.tubes:
        det = [Fiducial("tube", np.linspace(t.start, t.end, 12)[1:-1], t.direction, t.length_mm, t.radius_mm, 0.0)
               for t in model.tubes]
        hyps = _tube_hypotheses(det, model)
    else:
        det = [Fiducial("sphere", s.centre[None], None, 0.0, s.radius_mm, 0.0) for s in model.spheres]
        hyps = _sphere_hypotheses(det, model, tol_mm=0.1)
    n = len(det)
    out = []
    for R, t in hyps:
        if np.allclose(R, np.eye(3), atol=1e-6) and np.allclose(t, 0, atol=1e-6):
            continue
        pairs = _assign(R, t, det, model, tol_mm)
        if len(pairs) == n and not any(_pose_distance(R, t, m[:3, :3], m[:3, 3], model) < tol_mm for m in out) and \
                _pose_distance(R, t, np.eye(3), np.zeros(3), model) > tol_mm:
            m = np.eye(4)
            m[:3, :3], m[:3, 3] = R, t
            out.append(m)
    return out

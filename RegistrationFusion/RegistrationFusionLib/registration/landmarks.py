"""Capsule correspondence and point-based (landmark) registration with error prediction.

Frames and units: every point is RAS in millimetres. The *fixed* set is the CT (the world the needle
is planned in), the *moving* set is the MRI; a transform is a 4x4 RAS matrix that maps MRI-world
points to CT-world points (the MRML "transform to parent" of the MRI node).

Localisation error (FLE) convention used throughout this module:

* a scalar ``fle`` is the RMS 3-D localisation error magnitude (mm), as in Fitzpatrick, West and
  Maurer 1998, i.e. an isotropic error with per-axis SD ``fle / sqrt(3)``;
* a 3-vector is the per-axis SD (mm) along the image's own i, j, k axes (give the image direction
  matrix so it can be turned into RAS; thick MRI slices give a large k value);
* an (N, 3) array gives a per-axis SD for every marker, an (N, 3, 3) array full RAS covariances (mm^2).

Main entry points: :func:`match_capsules` (unordered sets -> pairs), :func:`register_points`
(pairs -> :class:`PointRegistration` with residuals, FRE, leave-one-out error, outlier exclusion and
predicted TRE) and :func:`register_capsules` (both).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import numpy as np

from RegistrationFusionLib.errors import RegistrationFusionError

logger = logging.getLogger(__name__)


class DegenerateLayoutError(RegistrationFusionError):
    """Too few markers, or markers (nearly) on one line: the rotation is not determined."""


class CorrespondenceError(RegistrationFusionError):
    """The CT and MRI capsule sets cannot be paired reliably."""


def _with_pairs(n_pairs: int, exc: CorrespondenceError) -> CorrespondenceError:
    """``exc`` with ``n_pairs``: how many capsule pairs could be formed (fewer than 3: no capsule fusion)."""
    exc.n_pairs = int(n_pairs)
    return exc


class AmbiguousCorrespondenceError(CorrespondenceError):
    """Two different pairings of the capsules fit about equally well (near-symmetric layout)."""

    def __init__(self, message: str, candidates: list | None = None):
        super().__init__(message)
        self.candidates = candidates or []


# ------------------------------------------------------------------------------------------------
# FLE handling
# ------------------------------------------------------------------------------------------------
def fle_covariances(fle, n: int, direction_ras: np.ndarray | None = None) -> np.ndarray:
    """Per-marker localisation covariance (n, 3, 3) in RAS (mm^2) from any accepted FLE form.

    ``fle``: scalar RMS magnitude (mm), per-axis SD 3-vector (mm, image axes), (n, 3) per-marker
    per-axis SD, or (n, 3, 3) RAS covariances. ``direction_ras``: 3x3 direction cosines of the image
    (columns i, j, k in RAS); identity when omitted.
    """
    a = np.asarray(fle, dtype=float)
    d = np.eye(3) if direction_ras is None else np.asarray(direction_ras, float).reshape(3, 3)
    if a.ndim == 0:
        if not np.isfinite(a) or a < 0:
            raise RegistrationFusionError(f"the localisation error {float(a)} mm is not a valid non-negative number")
        return np.repeat((np.eye(3) * (float(a) ** 2 / 3.0))[None], n, axis=0)
    if a.shape == (3,):
        a = np.repeat(a[None], n, axis=0)
    if a.shape == (n, 3):
        if np.any(~np.isfinite(a)) or np.any(a < 0):
            raise RegistrationFusionError("the per-axis localisation errors must be finite and non-negative (mm)")
        return np.einsum("ij,nj,kj->nik", d, a ** 2, d)
    if a.shape == (n, 3, 3):
        return a.copy()
    raise RegistrationFusionError(
        f"localisation error of shape {a.shape} does not fit {n} markers; give a number (mm), "
        "a per-axis SD triple, one triple per marker or one 3x3 covariance per marker")


def fle_rms(cov: np.ndarray) -> float:
    """RMS 3-D localisation error magnitude (mm) of covariances (n, 3, 3)."""
    return float(np.sqrt(np.mean(np.trace(cov, axis1=1, axis2=2))))


# ------------------------------------------------------------------------------------------------
# Layout checks and transforms
# ------------------------------------------------------------------------------------------------
def off_line_spread_mm(points: np.ndarray) -> float:
    """RMS distance (mm) of the points from their best-fit straight line (0 for collinear points)."""
    p = np.asarray(points, float)
    if len(p) < 3:
        return 0.0
    s = np.linalg.svd(p - p.mean(axis=0), compute_uv=False)
    return float(np.sqrt((s[1] ** 2 + s[2] ** 2) / len(p)))


def check_layout(points: np.ndarray, what: str = "capsules", min_off_line_mm: float = 5.0) -> None:
    """Refuse layouts that cannot determine a rigid transform (fewer than 3, or on one line)."""
    p = np.asarray(points, float)
    if p.ndim != 2 or p.shape[1] != 3:
        raise DegenerateLayoutError(f"the {what} must be given as an (N, 3) array of RAS points in mm")
    if not np.all(np.isfinite(p)):
        raise DegenerateLayoutError(f"some {what} have non-finite coordinates; re-run capsule detection")
    if len(p) < 3:
        raise DegenerateLayoutError(
            f"only {len(p)} {what} available; at least 3 non-collinear capsules are needed to register, "
            "place more capsules (two lines) and re-scan")
    spread = off_line_spread_mm(p)
    if spread < min_off_line_mm:
        raise DegenerateLayoutError(
            f"the {len(p)} {what} lie (nearly) on one straight line (RMS {spread:.1f} mm off the line, "
            f"{min_off_line_mm:.0f} mm needed), which leaves the rotation about that line undetermined; "
            "add a second line of capsules a few centimetres away and re-scan")


def _kabsch(moving: np.ndarray, fixed: np.ndarray, scaling: bool = False):
    """Least-squares R, t (, s) with fixed ~ s R moving + t; proper rotation (det +1) guaranteed."""
    mc, fc = moving.mean(axis=0), fixed.mean(axis=0)
    a, b = moving - mc, fixed - fc
    h = a.T @ b
    u, s, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    dm = np.diag([1.0, 1.0, d])
    r = vt.T @ dm @ u.T
    scale = 1.0
    if scaling:
        var = float(np.sum(a ** 2))
        scale = float(np.sum(s * np.diag(dm)) / var) if var > 0 else 1.0
    t = fc - scale * r @ mc
    return r, t, scale


def fit_transform(moving: np.ndarray, fixed: np.ndarray, scaling: bool = False) -> np.ndarray:
    """4x4 RAS matrix mapping ``moving`` points onto ``fixed`` points in the least-squares sense.

    Rigid (Kabsch/Horn with reflection guard) or, with ``scaling``, similarity (Umeyama).
    """
    r, t, s = _kabsch(np.asarray(moving, float), np.asarray(fixed, float), scaling)
    m = np.eye(4)
    m[:3, :3] = s * r
    m[:3, 3] = t
    return m


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 matrix to points (N, 3) or (3,)."""
    p = np.asarray(points, float)
    m = np.asarray(matrix, float)
    return p @ m[:3, :3].T + m[:3, 3]


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """Rotation angle (degrees) of the rotation part of a rigid/similarity 4x4 matrix."""
    r = np.asarray(matrix, float)[:3, :3]
    r = r / np.cbrt(np.linalg.det(r))
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))


# ------------------------------------------------------------------------------------------------
# Correspondence
# ------------------------------------------------------------------------------------------------
@dataclass
class Correspondence:
    """Pairs of (fixed/CT index, moving/MRI index), how well they fit, and the runner-up pairing."""

    pairs: list[tuple[int, int]]
    unmatched_fixed: list[int]
    unmatched_moving: list[int]
    rms_mm: float
    runner_up_rms_mm: float | None = None
    runner_up_pairs: list[tuple[int, int]] | None = None
    rotation_deg: float = 0.0
    note: str = ""

    @property
    def fixed_indices(self) -> np.ndarray:
        return np.array([p[0] for p in self.pairs], int)

    @property
    def moving_indices(self) -> np.ndarray:
        return np.array([p[1] for p in self.pairs], int)

    def to_dict(self) -> dict:
        return {
            "pairs_ct_mri": [list(map(int, p)) for p in self.pairs],
            "unmatched_ct": list(map(int, self.unmatched_fixed)),
            "unmatched_mri": list(map(int, self.unmatched_moving)),
            "rms_mm": float(self.rms_mm),
            "runner_up_rms_mm": None if self.runner_up_rms_mm is None else float(self.runner_up_rms_mm),
            "runner_up_pairs_ct_mri": None if self.runner_up_pairs is None else [list(map(int, p)) for p in self.runner_up_pairs],
            "rotation_deg": float(self.rotation_deg),
            "note": self.note,
        }


def _triangle_ok(p: np.ndarray, min_height_mm: float) -> bool:
    """True when the triangle's smallest height is large enough to fix a rotation."""
    e = [np.linalg.norm(p[1] - p[0]), np.linalg.norm(p[2] - p[1]), np.linalg.norm(p[0] - p[2])]
    area2 = np.linalg.norm(np.cross(p[1] - p[0], p[2] - p[0]))
    return max(e) > 0 and area2 / max(e) >= min_height_mm


def _assign(fixed: np.ndarray, moved: np.ndarray, gate_mm: float):
    """Optimal one-to-one assignment with gating; returns list of (fi, mi) within the gate."""
    from scipy.optimize import linear_sum_assignment

    d = np.linalg.norm(fixed[:, None, :] - moved[None, :, :], axis=2)
    big = 1e6
    cost = np.where(d <= gate_mm, d, big)
    ri, ci = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(ri, ci) if d[i, j] <= gate_mm]


def match_capsules(fixed_ct: np.ndarray, moving_mri: np.ndarray, *, gate_mm: float = 5.0,
                   max_unmatched: int = 1, ambiguity_margin_mm: float = 1.0,
                   max_rotation_deg: float | None = 45.0, min_off_line_mm: float = 5.0,
                   scaling: bool = False) -> Correspondence:
    """Pair unordered CT and MRI capsule centres using rigid-invariant geometry.

    Hypothesise-and-verify: every well-shaped CT triplet is paired with every ordered MRI triplet whose
    three inter-capsule distances agree within ``gate_mm``; the rigid transform of the triplet maps all
    MRI capsules into CT space, where a gated optimal assignment counts how many capsules agree. The
    pairing with most capsules, then lowest RMS (after a refit on all its pairs) wins.

    ``max_unmatched``: capsules allowed without a partner on each side (one extra or missing marker).
    ``ambiguity_margin_mm``: if a *different* pairing with as many capsules fits within this RMS of the
    best, the layout is (near-)symmetric. Both images are in patient RAS (DICOM patient coordinates
    follow the patient, prone or supine), so the true MRI->CT rotation is only the change in the
    patient's pose; ``max_rotation_deg`` (default 45) uses that prior to break the tie when exactly one
    candidate lies within it (reported in ``note``). Otherwise, or with ``max_rotation_deg=None``,
    :class:`AmbiguousCorrespondenceError` is raised. Raises :class:`DegenerateLayoutError`, :class:`CorrespondenceError`.
    """
    f = np.asarray(fixed_ct, float)
    m = np.asarray(moving_mri, float)
    check_layout(f, "capsules found in the CT", min_off_line_mm)
    check_layout(m, "capsules found in the MRI", min_off_line_mm)
    nf, nm = len(f), len(m)
    if abs(nf - nm) > max_unmatched:
        raise CorrespondenceError(
            f"{nf} capsules were found in the CT but {nm} in the MRI; at most {max_unmatched} may differ, "
            "check the capsule detections (missed or false markers) and re-run")
    df = np.linalg.norm(f[:, None] - f[None], axis=2)
    dm = np.linalg.norm(m[:, None] - m[None], axis=2)
    min_height = max(2.0 * gate_mm, 0.25 * min_off_line_mm)

    f_tris = [t for t in itertools.combinations(range(nf), 3) if _triangle_ok(f[list(t)], min_height)]
    if not f_tris:
        f_tris = [t for t in itertools.combinations(range(nf), 3) if _triangle_ok(f[list(t)], min_off_line_mm / 4)]
    m_tris = np.array(list(itertools.permutations(range(nm), 3)), int)
    m_side = np.stack([dm[m_tris[:, 0], m_tris[:, 1]], dm[m_tris[:, 1], m_tris[:, 2]], dm[m_tris[:, 2], m_tris[:, 0]]], 1)

    results: dict[frozenset, tuple[int, float, np.ndarray]] = {}
    for t in f_tris:
        fs = np.array([df[t[0], t[1]], df[t[1], t[2]], df[t[2], t[0]]])
        ok = np.all(np.abs(m_side - fs) <= gate_mm, axis=1)
        for mt in m_tris[ok]:
            tx = fit_transform(m[mt], f[list(t)], scaling)
            pairs = _assign(f, apply_transform(tx, m), gate_mm)
            if len(pairs) < 3:
                continue
            key = frozenset(pairs)
            if key in results:
                continue
            fi = [p[0] for p in pairs]
            mi = [p[1] for p in pairs]
            if off_line_spread_mm(f[fi]) < min_off_line_mm:
                continue
            tx2 = fit_transform(m[mi], f[fi], scaling)
            # re-assign after the refit (may pick up capsules the triplet transform missed)
            pairs2 = _assign(f, apply_transform(tx2, m), gate_mm)
            if len(pairs2) > len(pairs):
                fi = [p[0] for p in pairs2]
                mi = [p[1] for p in pairs2]
                tx2 = fit_transform(m[mi], f[fi], scaling)
                pairs = pairs2
                key = frozenset(pairs)
            res = np.linalg.norm(apply_transform(tx2, m[mi]) - f[fi], axis=1)
            results[key] = (len(pairs), float(np.sqrt(np.mean(res ** 2))), tx2)

    if not results:
        raise _with_pairs(0, CorrespondenceError(
            "no consistent pairing of the CT and MRI capsules was found (their spacings do not agree within "
            f"{gate_mm:.1f} mm); check that both images show the same capsules and that the MRI pixel size is right"))
    ranked = sorted(results.items(), key=lambda kv: (-kv[1][0], kv[1][1]))
    best_n = ranked[0][1][0]
    need = max(nf, nm) - max_unmatched
    if best_n < max(3, need):
        raise _with_pairs(best_n, CorrespondenceError(
            f"only {best_n} of {nf} CT / {nm} MRI capsules could be paired consistently (at least {max(3, need)} "
            "needed); some capsules may have moved or been mis-detected, check the detections and re-run"))
    contenders = [kv for kv in ranked if kv[1][0] == best_n and kv[1][1] <= ranked[0][1][1] + ambiguity_margin_mm]
    note = ""
    if len(contenders) > 1 and max_rotation_deg is not None:
        plausible = [kv for kv in contenders if rotation_angle_deg(kv[1][2]) <= max_rotation_deg]
        if len(plausible) == 1:
            note = (f"{len(contenders)} pairings fit about equally well (symmetric capsule layout); chose the only one "
                    f"within {max_rotation_deg:.0f} degrees of rotation between the scans")
            logger.warning(note)
            contenders = plausible
        elif plausible:
            contenders = plausible
    if len(contenders) > 1:
        (k1, (n1, r1, t1)), (k2, (n2, r2, t2)) = contenders[0], contenders[1]
        raise AmbiguousCorrespondenceError(
            f"the capsule layout is (nearly) symmetric: two different pairings of the {n1} capsules fit about equally "
            f"well (RMS {r1:.2f} mm vs {r2:.2f} mm, rotations {rotation_angle_deg(t1):.0f} and "
            f"{rotation_angle_deg(t2):.0f} degrees); add or move one capsule to break the symmetry, "
            "or pair the capsules manually",
            candidates=[sorted(k1), sorted(k2)])
    key, (n, rms, tx) = contenders[0]
    pairs = sorted(key)
    runner = next((kv for kv in ranked if kv[0] != key and kv[1][0] >= n - 1), None)
    unf = sorted(set(range(nf)) - {p[0] for p in pairs})
    unm = sorted(set(range(nm)) - {p[1] for p in pairs})
    if unf or unm:
        logger.info("capsule pairing left CT %s and MRI %s without partner", unf, unm)
    return Correspondence(pairs, unf, unm, rms,
                          None if runner is None else runner[1][1],
                          None if runner is None else sorted(runner[0]),
                          rotation_angle_deg(tx), note)


# ------------------------------------------------------------------------------------------------
# Error prediction
# ------------------------------------------------------------------------------------------------
def _skew(v: np.ndarray) -> np.ndarray:
    x, y, z = v
    return np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]], float)


def _jacobian(points: np.ndarray) -> np.ndarray:
    """(3N, 6) derivative of R p + t wrt (small rotation vector, translation) at the points."""
    return np.concatenate([np.concatenate([-_skew(p), np.eye(3)], axis=1) for p in points], axis=0)


def parameter_covariance(fixed_points: np.ndarray, cov_fixed: np.ndarray, cov_moving_in_fixed: np.ndarray) -> np.ndarray:
    """First-order (6, 6) covariance of the rigid least-squares estimate (rotation vector rad, translation mm).

    Linearises the unweighted least-squares fit around the solution (as in Fitzpatrick, West & Maurer
    1998, extended to anisotropic, per-marker FLE as in Danilchenko & Fitzpatrick 2011): the effective
    noise at marker i is the fixed FLE plus the moving FLE rotated into the fixed frame.
    """
    c = np.asarray(fixed_points, float).mean(axis=0)
    j = _jacobian(np.asarray(fixed_points, float) - c)
    jtj_inv = np.linalg.inv(j.T @ j)
    n = len(fixed_points)
    cblk = np.zeros((3 * n, 3 * n))
    for i in range(n):
        cblk[3 * i:3 * i + 3, 3 * i:3 * i + 3] = cov_fixed[i] + cov_moving_in_fixed[i]
    return jtj_inv @ j.T @ cblk @ j @ jtj_inv


def fwm_tre(points: np.ndarray, fiducials: np.ndarray, fle_rms_mm: float) -> np.ndarray:
    """Fitzpatrick-West-Maurer 1998 expected RMS TRE (mm) at ``points`` (M, 3) for isotropic FLE.

    TRE^2(r) = FLE^2/N (1 + 1/3 sum_k d_k^2 / f_k^2), d_k distance of r from principal axis k of the
    fiducial configuration, f_k RMS distance of the fiducials from that axis.
    """
    fid = np.asarray(fiducials, float)
    n = len(fid)
    c = fid.mean(axis=0)
    _, _, vt = np.linalg.svd(fid - c)
    fc = (fid - c) @ vt.T
    pc = (np.atleast_2d(np.asarray(points, float)) - c) @ vt.T
    total = np.zeros(len(pc))
    for k in range(3):
        others = [a for a in range(3) if a != k]
        f2 = np.mean(np.sum(fc[:, others] ** 2, axis=1))
        d2 = np.sum(pc[:, others] ** 2, axis=1)
        total += d2 / f2
    return np.sqrt(fle_rms_mm ** 2 / n * (1 + total / 3.0))


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
@dataclass
class ExcludedMarker:
    """A capsule pair left out of the final fit, with the reason shown to the user."""

    pair_index: int
    residual_mm: float
    expected_mm: float
    reason: str

    def to_dict(self) -> dict:
        return {"pair_index": int(self.pair_index), "residual_mm": float(self.residual_mm),
                "expected_mm": float(self.expected_mm), "reason": self.reason}


@dataclass
class PointRegistration:
    """Result of landmark registration (MRI -> CT, RAS mm).

    ``residuals_mm`` and ``loo_mm`` have one entry per input pair (excluded pairs: residual under the
    final transform, loo NaN). ``expected_residual_mm``: RMS residual each used pair should show given
    its FLE. ``cov_fixed``/``cov_moving``: per-pair localisation covariances in RAS (moving: in MRI RAS).
    """

    matrix: np.ndarray
    scale: float
    fixed_points: np.ndarray
    moving_points: np.ndarray
    used: np.ndarray
    residuals_mm: np.ndarray
    expected_residual_mm: np.ndarray
    fre_mm: float
    loo_mm: np.ndarray
    excluded: list[ExcludedMarker]
    cov_fixed: np.ndarray
    cov_moving: np.ndarray
    pair_labels: list[str] = field(default_factory=list)

    # --- derived -------------------------------------------------------------------------------
    @property
    def rotation_deg(self) -> float:
        return rotation_angle_deg(self.matrix)

    @property
    def fle_effective_mm(self) -> float:
        """RMS combined CT+MRI localisation error of the used markers (mm)."""
        u = self.used
        return float(np.sqrt(fle_rms(self.cov_fixed[u]) ** 2 + fle_rms(self.cov_moving[u]) ** 2))

    def _cov_moving_in_fixed(self) -> np.ndarray:
        r = self.matrix[:3, :3] / self.scale
        return np.einsum("ij,njk,lk->nil", r, self.cov_moving[self.used], r)

    def target_covariance(self, points_ct: np.ndarray) -> np.ndarray:
        """(M, 3, 3) first-order covariance (mm^2, CT RAS) of the registration error at CT points."""
        u = self.used
        fid = self.fixed_points[u]
        cov = parameter_covariance(fid, self.cov_fixed[u], self._cov_moving_in_fixed())
        c = fid.mean(axis=0)
        out = []
        for q in np.atleast_2d(np.asarray(points_ct, float)):
            a = np.concatenate([-_skew(q - c), np.eye(3)], axis=1)
            out.append(a @ cov @ a.T)
        return np.array(out)

    def predicted_tre(self, points_ct: np.ndarray) -> np.ndarray:
        """Predicted RMS target registration error (mm) at CT-RAS points (M, 3), anisotropic FLE aware."""
        return np.sqrt(np.trace(self.target_covariance(points_ct), axis1=1, axis2=2))

    def predicted_tre_fwm(self, points_ct: np.ndarray) -> np.ndarray:
        """Fitzpatrick-West-Maurer isotropic prediction (mm) using the RMS combined FLE."""
        return fwm_tre(points_ct, self.fixed_points[self.used], self.fle_effective_mm)

    def transform_points(self, points_mri: np.ndarray) -> np.ndarray:
        """MRI-RAS points -> CT-RAS points (mm)."""
        return apply_transform(self.matrix, points_mri)

    def to_dict(self) -> dict:
        return {
            "matrix_mri_to_ct_ras": np.asarray(self.matrix).tolist(),
            "scale": float(self.scale),
            "rotation_deg": self.rotation_deg,
            "fre_mm": float(self.fre_mm),
            "fle_effective_mm": self.fle_effective_mm,
            "markers": [
                {"pair_index": i, "label": self.pair_labels[i] if i < len(self.pair_labels) else str(i),
                 "ct_ras": self.fixed_points[i].tolist(), "mri_ras": self.moving_points[i].tolist(),
                 "used": bool(i in set(self.used.tolist())),
                 "residual_mm": float(self.residuals_mm[i]),
                 "expected_residual_mm": float(self.expected_residual_mm[i]),
                 "loo_mm": None if not np.isfinite(self.loo_mm[i]) else float(self.loo_mm[i]),
                 "cov_ct_mm2": np.asarray(self.cov_fixed[i]).tolist(),
                 "cov_mri_mm2": np.asarray(self.cov_moving[i]).tolist()}
                for i in range(len(self.fixed_points))],
            "excluded": [e.to_dict() for e in self.excluded],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PointRegistration":
        """The registration back from :meth:`to_dict` (e.g. the QA stored at approval), as far as the predicted
        TRE and the error model need it (excluded capsules keep their flag, not their reasons). Anything missing,
        non-finite or of the wrong shape is refused: the error predicted from it would be wrong."""
        try:
            markers = list(d["markers"])
            m = np.asarray(d["matrix_mri_to_ct_ras"], float)
            scale = float(d["scale"])
            fixed = np.array([mk["ct_ras"] for mk in markers], float).reshape(-1, 3)
            moving = np.array([mk["mri_ras"] for mk in markers], float).reshape(-1, 3)
            used = np.array([i for i, mk in enumerate(markers) if mk["used"] is True], int)
            res = np.array([mk["residual_mm"] for mk in markers], float)
            exp = np.array([mk["expected_residual_mm"] for mk in markers], float)
            loo = np.array([np.nan if mk["loo_mm"] is None else mk["loo_mm"] for mk in markers], float)
            cov_f = np.array([mk["cov_ct_mm2"] for mk in markers], float)
            cov_m = np.array([mk["cov_mri_mm2"] for mk in markers], float)
            fre = float(d["fre_mm"])
            labels = [str(mk["label"]) for mk in markers]
        except (KeyError, TypeError, ValueError) as e:
            raise RegistrationFusionError(f"the stored capsule registration is incomplete ({e!r}); register again") from e
        n = len(markers)
        if (m.shape != (4, 4) or cov_f.shape != (n, 3, 3) or cov_m.shape != (n, 3, 3) or len(used) < 3
                or not all(np.all(np.isfinite(a)) for a in (m, fixed, moving, cov_f, cov_m, res, exp))
                or not np.isfinite(scale) or scale <= 0):
            raise RegistrationFusionError("the stored capsule registration is incomplete or not finite; register again")
        return cls(m, scale, fixed, moving, used, res, exp, fre, loo, [], cov_f, cov_m, labels)


def _expected_residuals(fixed: np.ndarray, cov_f: np.ndarray, cov_m_in_f: np.ndarray) -> np.ndarray:
    """Expected RMS residual (mm) per marker: sqrt(trace of the residual covariance block)."""
    n = len(fixed)
    j = _jacobian(fixed - fixed.mean(axis=0))
    p = np.eye(3 * n) - j @ np.linalg.inv(j.T @ j) @ j.T
    c = np.zeros((3 * n, 3 * n))
    for i in range(n):
        c[3 * i:3 * i + 3, 3 * i:3 * i + 3] = cov_f[i] + cov_m_in_f[i]
    rc = p @ c @ p.T
    return np.sqrt(np.maximum([np.trace(rc[3 * i:3 * i + 3, 3 * i:3 * i + 3]) for i in range(n)], 0.0))


def register_points(fixed_ct: np.ndarray, moving_mri: np.ndarray, *, fle_ct=0.3, fle_mri=0.5,
                    direction_ct: np.ndarray | None = None, direction_mri: np.ndarray | None = None,
                    scaling: bool = False, exclude_outliers: bool = True, outlier_factor: float = 3.0,
                    outlier_floor_mm: float = 1.0, max_outliers: int = 2, min_off_line_mm: float = 5.0,
                    pair_labels: list[str] | None = None) -> PointRegistration:
    """Landmark registration of paired points, MRI -> CT (4x4 RAS).

    ``fixed_ct``/``moving_mri``: (N, 3) RAS mm, row i of one is the partner of row i of the other.
    ``fle_ct``/``fle_mri``: localisation error in the forms described in the module docstring;
    ``direction_*``: image direction matrices for per-axis SDs. Rigid (SVD with reflection guard) or,
    with ``scaling``, similarity (Umeyama).

    Outliers: while allowed (at most ``max_outliers``, keeping at least 3 non-collinear markers), the
    pair with the largest residual/expected ratio is excluded if its residual exceeds
    ``max(outlier_factor * expected, outlier_floor_mm)``; the reason is recorded.
    Raises :class:`DegenerateLayoutError` for < 3 or (near-)collinear markers.
    """
    f = np.asarray(fixed_ct, float)
    m = np.asarray(moving_mri, float)
    if f.shape != m.shape:
        raise RegistrationFusionError(
            f"{len(f)} CT capsules and {len(m)} MRI capsules were given as pairs; pair the capsules first (match_capsules)")
    check_layout(f, "paired capsules", min_off_line_mm)
    check_layout(m, "paired MRI capsules", min_off_line_mm)
    n = len(f)
    cov_f = fle_covariances(fle_ct, n, direction_ct)
    cov_m = fle_covariances(fle_mri, n, direction_mri)
    labels = list(pair_labels) if pair_labels else [str(i) for i in range(n)]

    used = list(range(n))
    excluded: list[ExcludedMarker] = []

    def fit(idx):
        tx = fit_transform(m[idx], f[idx], scaling)
        r = tx[:3, :3] / np.cbrt(np.linalg.det(tx[:3, :3]))
        cmf = np.einsum("ij,njk,lk->nil", r, cov_m[idx], r)
        return tx, cmf

    while True:
        tx, cmf = fit(used)
        res = np.linalg.norm(apply_transform(tx, m[used]) - f[used], axis=1)
        exp = _expected_residuals(f[used], cov_f[used], cmf)
        if not exclude_outliers or len(excluded) >= max_outliers or len(used) <= 3:
            break
        limit = np.maximum(outlier_factor * exp, outlier_floor_mm)
        ratio = res / np.maximum(exp, 1e-9)
        cand = [k for k in np.argsort(-ratio) if res[k] > limit[k]]
        if not cand:
            break
        k = int(cand[0])
        rest = [u for u in used if u != used[k]]
        if len(rest) < 3 or off_line_spread_mm(f[rest]) < min_off_line_mm:
            logger.warning("capsule %s looks like an outlier (%.2f mm) but is needed to keep 3 non-collinear markers",
                           labels[used[k]], res[k])
            break
        reason = (f"capsule {labels[used[k]]} excluded: residual {res[k]:.2f} mm exceeds "
                  f"{limit[k]:.2f} mm ({outlier_factor:g} x the {exp[k]:.2f} mm expected from its localisation error)")
        logger.info(reason)
        excluded.append(ExcludedMarker(used[k], float(res[k]), float(exp[k]), reason))
        used = rest

    all_res = np.linalg.norm(apply_transform(tx, m) - f, axis=1)
    expected = np.full(n, np.nan)
    expected[used] = exp
    for e in excluded:
        expected[e.pair_index] = e.expected_mm
    fre = float(np.sqrt(np.mean(all_res[used] ** 2)))

    loo = np.full(n, np.nan)
    if len(used) >= 4:
        for i in used:
            rest = [u for u in used if u != i]
            if off_line_spread_mm(f[rest]) < min_off_line_mm:
                continue
            t_i = fit_transform(m[rest], f[rest], scaling)
            loo[i] = float(np.linalg.norm(apply_transform(t_i, m[i]) - f[i]))
    scale = float(np.cbrt(np.linalg.det(tx[:3, :3])))
    result = PointRegistration(tx, scale, f, m, np.array(used, int), all_res, expected, fre, loo, excluded,
                               cov_f, cov_m, labels)
    logger.info("landmark registration: %d markers used, FRE %.2f mm, rotation %.1f deg", len(used), fre,
                result.rotation_deg)
    return result


def register_capsules(ct_points: np.ndarray, mri_points: np.ndarray, *, fle_ct=0.3, fle_mri=0.5,
                      direction_ct=None, direction_mri=None, match_options: dict | None = None,
                      **register_options) -> tuple[Correspondence, PointRegistration]:
    """Match unordered capsule sets then register them (MRI -> CT). Per-marker FLE arrays follow the inputs."""
    corr = match_capsules(ct_points, mri_points, **(match_options or {}))
    fi, mi = corr.fixed_indices, corr.moving_indices

    def pick(fle, idx, total):
        a = np.asarray(fle, float)
        return a[idx] if a.ndim >= 1 and a.shape[0] == total and a.shape != (3,) else fle

    labels = [f"CT{a}/MR{b}" for a, b in corr.pairs]
    reg = register_points(np.asarray(ct_points, float)[fi], np.asarray(mri_points, float)[mi],
                          fle_ct=pick(fle_ct, fi, len(ct_points)), fle_mri=pick(fle_mri, mi, len(mri_points)),
                          direction_ct=direction_ct, direction_mri=direction_mri, pair_labels=labels,
                          **register_options)
    return corr, reg

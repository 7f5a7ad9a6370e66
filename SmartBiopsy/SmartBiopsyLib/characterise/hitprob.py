"""Hit probability: how likely the biopsy notch samples the intended habitat, by Monte Carlo.

Definition (stated in every result as ``definition``): the notch *samples the intended habitat* when at
least ``min_fraction`` (default 50 %) of the notch volume lies inside the habitat region, i.e. inside the
voxels of the habitat label map carrying that region's label (all of them, not only the largest component).
The hit probability is the fraction of Monte Carlo draws that do so.

One draw (all in the habitat map's world, RAS mm):

* the notch is aimed with its centre on the target point along the needle direction (the planner's
  convention: the target is where the centre of the specimen ends up);
* registration error: a 3-D Gaussian displacement with the target's predicted covariance
  (:class:`RegistrationError`; from a 3x3 covariance, an RMS TRE or a 95th percentile);
* needle placement error: a 2-D Gaussian displacement perpendicular to the needle axis with RMS distance
  ``lateral_error_mm`` (default: the needle model's ``placement_error_lateral_mm``, 2 mm), plus an optional
  Gaussian depth error along the axis (SD ``axial_error_mm``, default 0);
* direction: the planned trajectory's direction when given; otherwise (no plan yet) it is unknown and each
  draw takes a direction uniformly distributed in the axial plane (CT-guided biopsies are planned in-plane);
* the notch region is the one :func:`SmartBiopsyLib.sampling.notch.notch_roi` defines for the needle:
  ``side-notch`` an oriented box (notch length x core diameter x core diameter) or ``tip-distal`` a cylinder
  (20 mm x 2 mm by default);
* the fraction inside the region is a quadrature over a regular grid of points filling the notch (cell
  centres, at most ``step_mm`` apart, equal weights), each labelled by the habitat voxel that contains it.

The Monte Carlo standard error is sqrt(p (1 - p) / n). Draws are seeded (``seed``), so equal inputs give
equal results, and candidates evaluated with the same seed share their random numbers (a fair comparison).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.geometry import RasVolume

logger = logging.getLogger(__name__)

REGION_CODES = {"A": 1, "B": 2, "C": 3}

#: 95th percentile of the length of a 3-D standard normal vector (chi distribution, 3 degrees of freedom):
#: sqrt(scipy.stats.chi2.ppf(0.95, 3)).
CHI3_P95 = 2.7954834829151074

DEFAULT_SAMPLES = 4000
DEFAULT_MIN_FRACTION = 0.5
DEFAULT_STEP_MM = 1.0

DIRECTION_PLANNED = "planned trajectory"
DIRECTION_GIVEN = "given direction"
DIRECTION_AXIAL_UNIFORM = "no plan yet: uniform over axial in-plane directions"


def definition_text(min_fraction: float = DEFAULT_MIN_FRACTION) -> str:
    """The sentence that defines a hit, as written into every result."""
    return (f"probability that at least {100 * min_fraction:.0f}% of the notch volume lies inside the intended "
            "habitat region (its voxels in the habitat map), over registration and needle placement error")


def _finite_vector(v, what: str) -> np.ndarray:
    a = np.asarray(v, float).reshape(3)
    if not np.all(np.isfinite(a)):
        raise InputDataError(f"the {what} is not a finite RAS point or vector; check the target and the plan")
    return a


def _unit_rows(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def perpendicular_rows(axes: np.ndarray) -> np.ndarray:
    """Row-wise :func:`SmartBiopsyCoreLib.geometry.perpendicular`: unit vectors (N, 3) perpendicular to
    ``axes`` (N, 3), each built from the world axis least aligned with it (the notch ROI's ``u_axis``)."""
    helper = np.eye(3)[np.argmin(np.abs(axes), axis=1)]
    return _unit_rows(np.cross(axes, helper))


# ------------------------------------------------------------------------------------------------------
@dataclass
class RegistrationError:
    """Registration error at a target as a 3x3 covariance (mm^2) in the habitat map's world (RAS).

    Build it from the error model's output: :meth:`from_covariance`, :meth:`from_rms` (an RMS TRE, e.g. the
    landmark registration's predicted TRE), :meth:`from_p95` (a 95th percentile distance) or :meth:`from_sigma`
    (per-axis SD). The isotropic constructors spread the error equally over the three axes.
    """

    covariance_mm2: np.ndarray
    source: str = ""

    def __post_init__(self):
        c = np.asarray(self.covariance_mm2, float)
        if c.shape != (3, 3) or not np.all(np.isfinite(c)):
            raise InputDataError("the registration error covariance must be a finite 3x3 matrix (mm^2)")
        c = 0.5 * (c + c.T)
        if np.linalg.eigvalsh(c).min() < -1e-9 * max(1.0, float(np.trace(c))):
            raise InputDataError("the registration error covariance is not positive semi-definite; "
                                 "check the registration error model")
        self.covariance_mm2 = c

    @classmethod
    def from_covariance(cls, covariance_mm2, source: str = "covariance") -> "RegistrationError":
        return cls(np.asarray(covariance_mm2, float), source)

    @classmethod
    def from_sigma(cls, sigma_mm: float, source: str = "") -> "RegistrationError":
        """Isotropic: SD ``sigma_mm`` along each axis."""
        s = cls._check_mm(sigma_mm, "SD")
        return cls(np.eye(3) * s * s, source or f"isotropic, SD {s:.2f} mm per axis")

    @classmethod
    def from_rms(cls, rms_mm: float, source: str = "") -> "RegistrationError":
        """Isotropic with RMS 3-D distance ``rms_mm`` (per-axis SD = rms / sqrt(3))."""
        r = cls._check_mm(rms_mm, "RMS")
        return cls(np.eye(3) * r * r / 3.0, source or f"isotropic, RMS {r:.2f} mm")

    @classmethod
    def from_p95(cls, p95_mm: float, source: str = "") -> "RegistrationError":
        """Isotropic with 95th-percentile 3-D distance ``p95_mm`` (per-axis SD = p95 / 2.795)."""
        p = cls._check_mm(p95_mm, "95th percentile")
        s = p / CHI3_P95
        return cls(np.eye(3) * s * s, source or f"isotropic, 95th percentile {p:.2f} mm")

    @staticmethod
    def _check_mm(v, what) -> float:
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = float("nan")
        if not np.isfinite(v) or v < 0 or v > 100:
            raise InputDataError(f"the registration error {what} {v} mm is not plausible (0-100 mm); "
                                 "check the registration error model")
        return v

    @property
    def rms_mm(self) -> float:
        return float(np.sqrt(max(np.trace(self.covariance_mm2), 0.0)))

    @property
    def sigma_axes_mm(self) -> list[float]:
        """SDs along the covariance's principal axes (mm, largest first)."""
        return sorted((float(np.sqrt(max(w, 0.0))) for w in np.linalg.eigvalsh(self.covariance_mm2)), reverse=True)

    def rotated(self, linear_3x3) -> "RegistrationError":
        """The same error expressed in another frame: covariance A C A^T for x' = A x (e.g. CT -> MRI world)."""
        a = np.asarray(linear_3x3, float)
        return RegistrationError(a @ self.covariance_mm2 @ a.T, self.source)

    def to_dict(self) -> dict:
        return {"covariance_mm2": np.round(self.covariance_mm2, 6).tolist(), "rms_mm": round(self.rms_mm, 4),
                "sigma_principal_mm": [round(s, 4) for s in self.sigma_axes_mm], "source": self.source,
                "model": "3-D Gaussian displacement, zero mean"}


def registration_error_from(value, point_ras=None) -> RegistrationError:
    """A :class:`RegistrationError` from one, a number (RMS TRE, mm), a 3x3 covariance, or a callable
    ``f(point_ras)`` returning any of these."""
    if callable(value) and not isinstance(value, RegistrationError):
        value = value(point_ras)
    if isinstance(value, RegistrationError):
        return value
    a = np.asarray(value, float)
    if a.shape == (3, 3):
        return RegistrationError.from_covariance(a)
    if a.size == 1:
        return RegistrationError.from_rms(float(a), f"isotropic, predicted RMS TRE {float(a):.2f} mm")
    raise InputDataError("the registration error must be an RMS TRE in mm or a 3x3 covariance in mm^2")


# ------------------------------------------------------------------------------------------------------
@dataclass
class NotchGeometry:
    """The notch region's shape, independent of where it is (mm).

    ``tip_to_centre_mm``: signed distance along the insertion axis from the needle tip to the region's centre
    (side-notch: -(offset + length / 2), the notch lies behind the tip; tip-distal: +length / 2).
    """

    mode: str
    shape: str  #: "box" or "cylinder"
    length_mm: float
    half_widths_mm: tuple = (0.0, 0.0)
    radius_mm: float = 0.0
    tip_to_centre_mm: float = 0.0
    needle_name: str | None = None

    @classmethod
    def from_needle(cls, needle=None, mode: str = "side-notch", **notch_kwargs) -> "NotchGeometry":
        """Geometry of :func:`~SmartBiopsyLib.sampling.notch.notch_roi` for ``needle`` (a model or catalogue
        name; None = the default needle set) in ``mode``; ``notch_kwargs`` as for ``notch_roi``."""
        from SmartBiopsyLib.sampling.notch import notch_roi

        if needle is None:
            from TrajectoryPlannerLib.planning.needles import DEFAULT_NEEDLE
            needle = DEFAULT_NEEDLE
        roi = notch_roi(np.zeros(3), np.array([0.0, 0.0, 1.0]), mode, needle, **notch_kwargs)
        return cls(roi.mode, roi.shape, float(roi.length_mm), tuple(float(h) for h in roi.half_widths_mm),
                   float(roi.radius_mm), float(roi.centre_ras[2]), roi.needle_name)

    def quadrature(self, step_mm: float = DEFAULT_STEP_MM) -> np.ndarray:
        """Points (P, 3) filling the region in its local frame (u, v, s), s from the centre along the axis;
        cell centres of a regular grid at most ``step_mm`` apart (at least 3 across), equal volumes."""
        ns = max(3, int(np.ceil(self.length_mm / step_mm)))
        s = ((np.arange(ns) + 0.5) / ns - 0.5) * self.length_mm
        hu, hv = (self.half_widths_mm if self.shape == "box" else (self.radius_mm, self.radius_mm))
        nu = max(3, int(np.ceil(2 * hu / step_mm)))
        nv = max(3, int(np.ceil(2 * hv / step_mm)))
        if self.shape == "cylinder":  # a finer grid so the disc's outline is resolved
            nu = nv = max(nu, 7)
        u = ((np.arange(nu) + 0.5) / nu - 0.5) * 2 * hu
        v = ((np.arange(nv) + 0.5) / nv - 0.5) * 2 * hv
        uu, vv = np.meshgrid(u, v, indexing="ij")
        cross = np.stack([uu.ravel(), vv.ravel()], axis=1)
        if self.shape == "cylinder":
            cross = cross[np.hypot(cross[:, 0], cross[:, 1]) <= self.radius_mm]
        pts = np.concatenate([np.repeat(cross, ns, axis=0), np.tile(s, len(cross))[:, None]], axis=1)
        return pts

    def to_dict(self) -> dict:
        d = {"mode": self.mode, "shape": self.shape, "length_mm": round(self.length_mm, 4),
             "needle": self.needle_name, "placement": "notch centre on the target"}
        if self.shape == "box":
            d["width_mm"] = [round(2 * h, 4) for h in self.half_widths_mm]
        else:
            d["diameter_mm"] = round(2 * self.radius_mm, 4)
        return d


def _needle_lateral_error(needle) -> tuple[float, str | None]:
    from TrajectoryPlannerLib.errors import TrajectoryPlannerError
    from TrajectoryPlannerLib.planning.needles import (DEFAULT_NEEDLE, DEFAULT_PLACEMENT_ERROR_LATERAL_MM,
                                                       get_needle)

    model = needle if needle is not None else DEFAULT_NEEDLE
    if isinstance(model, str):
        try:
            model = get_needle(model)
        except TrajectoryPlannerError as exc:
            raise InputDataError(str(exc)) from None
    return (float(getattr(model, "placement_error_lateral_mm", DEFAULT_PLACEMENT_ERROR_LATERAL_MM)),
            getattr(model, "name", None))


def lateral_error_for(needle=None) -> float:
    """The needle model's lateral placement error (RMS mm); the default needle set's when ``needle`` is None."""
    return _needle_lateral_error(needle)[0]


# ------------------------------------------------------------------------------------------------------
@dataclass
class HitProbability:
    """Monte Carlo hit probability of one target (see the module docstring for the definition)."""

    target_name: str
    region: str
    point_ras: list
    probability: float
    standard_error: float
    mean_notch_fraction: float
    n_samples: int
    seed: int
    min_fraction: float
    definition: str
    registration: dict
    needle_lateral_rms_mm: float
    needle_axial_sd_mm: float
    direction_ras: list | None
    direction_source: str
    notch: dict
    quadrature_step_mm: float = DEFAULT_STEP_MM
    frame: str = "habitat map world (RAS mm)"
    fractions: np.ndarray | None = field(default=None, repr=False)  #: per-draw notch fraction (not in to_dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.probability

    def summary(self) -> str:
        return f"{self.percent:.0f}% (MC SE {100 * self.standard_error:.1f} pp)"

    def to_dict(self) -> dict:
        return {"target_name": self.target_name, "region": self.region,
                "point_ras": [round(float(v), 4) for v in self.point_ras],
                "probability": round(float(self.probability), 5),
                "standard_error": round(float(self.standard_error), 5),
                "mean_notch_fraction": round(float(self.mean_notch_fraction), 5),
                "n_samples": int(self.n_samples), "seed": int(self.seed), "min_fraction": float(self.min_fraction),
                "definition": self.definition, "registration_error": self.registration,
                "needle_lateral_rms_mm": float(self.needle_lateral_rms_mm),
                "needle_lateral_model": "2-D Gaussian perpendicular to the needle axis, zero mean",
                "needle_axial_sd_mm": float(self.needle_axial_sd_mm),
                "direction_ras": None if self.direction_ras is None else [round(float(v), 6) for v in self.direction_ras],
                "direction_source": self.direction_source, "notch": self.notch,
                "quadrature_step_mm": float(self.quadrature_step_mm), "frame": self.frame}


def draw_placements(point_ras, n: int, registration: RegistrationError, lateral_error_mm: float,
                    axial_error_mm: float = 0.0, direction=None, rng: np.random.Generator | None = None):
    """Monte Carlo draws of where the notch centre and axis end up relative to the habitat map.

    Returns ``(centres (n, 3), axes (n, 3))`` in the habitat map's world (RAS mm). ``direction``: the needle's
    insertion direction in that world, or None for a direction uniform over the axial plane per draw.
    The random numbers are taken in a fixed order (registration, direction, lateral, axial).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    p = _finite_vector(point_ras, "target point")
    w, vecs = np.linalg.eigh(registration.covariance_mm2)
    root = vecs * np.sqrt(np.clip(w, 0.0, None))  # root @ root.T = covariance
    reg = rng.standard_normal((n, 3)) @ root.T
    if direction is None:
        theta = rng.uniform(0.0, np.pi, n)
        axes = np.stack([np.cos(theta), np.sin(theta), np.zeros(n)], axis=1)
    else:
        d = _finite_vector(direction, "needle direction")
        if np.linalg.norm(d) == 0:
            raise InputDataError("the needle direction has zero length; entry and target must differ")
        axes = np.repeat((d / np.linalg.norm(d))[None], n, axis=0)
    u = perpendicular_rows(axes)
    v = np.cross(axes, u)
    lat = rng.standard_normal((n, 2)) * (float(lateral_error_mm) / np.sqrt(2.0))
    ax = rng.standard_normal(n) * float(axial_error_mm)
    centres = p + reg + lat[:, :1] * u + lat[:, 1:] * v + ax[:, None] * axes
    return centres, axes


def _voxel_half_diagonal(labels: RasVolume) -> float:
    m = labels.ijk_to_ras[:3, :3]
    return 0.5 * max(float(np.linalg.norm(m @ np.array([1.0, a, b]))) for a in (-1, 1) for b in (-1, 1))


def _certain_fractions(labels: RasVolume, code: int, centres: np.ndarray, radius_mm: float,
                       cache: dict | None = None) -> np.ndarray:
    """1 or 0 where the whole notch (within ``radius_mm`` of its centre) certainly lies in or out of the
    region, NaN where it has to be computed.

    Exact shortcut: every notch point's voxel centre lies within ``radius + 2 x voxel half-diagonal`` of the
    centre's voxel centre, so a centre voxel deeper than that inside (outside) the region gives 1 (0).
    """
    from scipy import ndimage

    lab = np.asarray(labels.array)
    out = np.full(len(centres), np.nan)
    margin = radius_mm + 2.0 * _voxel_half_diagonal(labels)
    key = (id(labels), int(code), round(margin, 6))
    if cache is not None and key in cache:
        lo, depth, away = cache[key]
    else:
        mask = lab == code
        if not mask.any():
            out[:] = 0.0
            return out
        sp_kji = labels.spacing[::-1]
        grow = np.ceil(margin / sp_kji).astype(int) + 2
        nz = np.argwhere(mask)
        lo = np.maximum(nz.min(axis=0) - grow, 0)
        hi = np.minimum(nz.max(axis=0) + grow + 1, lab.shape)
        sub = np.pad(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1)  # outside the crop counts as outside
        depth = ndimage.distance_transform_edt(sub, sampling=sp_kji)
        away = ndimage.distance_transform_edt(~sub, sampling=sp_kji)
        if cache is not None:
            cache[key] = (lo, depth, away)
    sub_shape = np.array(depth.shape)
    kji = np.floor(labels.ras_to_ijk_points(centres) + 0.5).astype(np.int64)[:, ::-1] - lo + 1
    in_crop = np.all((kji >= 1) & (kji < sub_shape - 1), axis=1)
    out[~in_crop] = 0.0  # farther than the margin from every region voxel
    k = kji[in_crop]
    d_in = depth[k[:, 0], k[:, 1], k[:, 2]]
    d_out = away[k[:, 0], k[:, 1], k[:, 2]]
    vals = np.full(len(k), np.nan)
    vals[d_in > margin] = 1.0
    vals[d_out > margin] = 0.0
    out[in_crop] = vals
    return out


def notch_fractions(labels: RasVolume, code: int, centres: np.ndarray, axes: np.ndarray, geometry: NotchGeometry,
                    step_mm: float = DEFAULT_STEP_MM, chunk_points: int = 2_000_000,
                    cache: dict | None = None) -> np.ndarray:
    """Fraction of the notch volume inside the voxels labelled ``code`` for each placement (n,).

    ``centres``/``axes`` (n, 3): notch centres and insertion axes in the label map's world (RAS mm).
    Points outside the map count as outside the region. Placements whose notch lies certainly wholly inside
    or outside the region skip the quadrature (exact; see :func:`_certain_fractions`). ``cache``: a dict
    kept by the caller across calls on the same label map (distance maps per region).
    """
    q = geometry.quadrature(step_mm)  # (P, 3): u, v, s
    centres = np.asarray(centres, float)
    out = _certain_fractions(labels, code, centres, float(np.linalg.norm(q, axis=1).max()), cache)
    todo = np.flatnonzero(np.isnan(out))
    if todo.size == 0:
        return out
    lab = np.asarray(labels.array)
    shape = np.array(lab.shape[::-1])  # (ni, nj, nk)
    inv = labels.ras_to_ijk
    axes = _unit_rows(np.asarray(axes, float)[todo])
    u = perpendicular_rows(axes)
    v = np.cross(axes, u)
    # everything in continuous voxel indices: centre + q_u * u + q_v * v + q_s * axis, mapped by the affine
    lin = inv[:3, :3].T
    cen = centres[todo] @ lin + inv[:3, 3] + 0.5  # + 0.5: floor() then gives the voxel containing the point
    u, v, w = u @ lin, v @ lin, axes @ lin
    per = max(1, chunk_points // len(q))
    for s0 in range(0, todo.size, per):
        sl = slice(s0, min(todo.size, s0 + per))
        pts = (cen[sl, None, :] + q[None, :, 0:1] * u[sl, None, :] + q[None, :, 1:2] * v[sl, None, :]
               + q[None, :, 2:3] * w[sl, None, :])
        ijk = np.floor(pts).astype(np.int64)
        ok = np.all((ijk >= 0) & (ijk < shape), axis=-1)
        ijk[~ok] = 0
        inside = (lab[ijk[..., 2], ijk[..., 1], ijk[..., 0]] == code) & ok
        out[todo[sl]] = inside.mean(axis=1)
    return out


def hit_probability(labels: RasVolume, region: str, point_ras, *, registration_error=1.0, needle=None,
                    mode: str = "side-notch", lateral_error_mm: float | None = None, axial_error_mm: float = 0.0,
                    direction=None, direction_source: str | None = None, n_samples: int = DEFAULT_SAMPLES,
                    seed: int = 0, min_fraction: float = DEFAULT_MIN_FRACTION, step_mm: float = DEFAULT_STEP_MM,
                    geometry: NotchGeometry | None = None, target_name: str = "",
                    notch_kwargs: dict | None = None, cache: dict | None = None) -> HitProbability:
    """Probability that the notch aimed at ``point_ras`` samples habitat ``region`` (A, B or C).

    ``labels``: the habitat label map (1 A, 2 B, 3 C); ``point_ras`` and ``direction`` are in its world
    (RAS mm). ``registration_error``: a :class:`RegistrationError`, an RMS TRE (mm) or a 3x3 covariance
    (mm^2) in that world. ``needle``: needle model or catalogue name (None = the default set) for the notch
    geometry and the lateral error (``lateral_error_mm`` overrides it, RMS mm). ``direction``: the needle's
    insertion direction, or None when there is no plan yet (uniform axial in-plane directions). A hit is at
    least ``min_fraction`` of the notch volume inside the region. ``cache``: see :func:`notch_fractions`.
    """
    code = REGION_CODES.get(str(region).upper())
    if code is None:
        raise InputDataError(f"habitat region '{region}' is unknown; use A, B or C")
    if not isinstance(labels, RasVolume) or np.asarray(labels.array).size == 0:
        raise InputDataError("the habitat map is empty or not a volume; compute the habitats first")
    n = int(n_samples)
    if n < 100:
        raise InputDataError(f"the hit probability needs at least 100 Monte Carlo samples (got {n})")
    if not 0.0 < float(min_fraction) <= 1.0:
        raise InputDataError(f"the notch fraction that counts as a hit must be in (0, 1] (got {min_fraction})")
    reg = registration_error_from(registration_error, point_ras)
    lat_model, needle_name = _needle_lateral_error(needle)
    lat = lat_model if lateral_error_mm is None else float(lateral_error_mm)
    if not np.isfinite(lat) or lat < 0 or not np.isfinite(axial_error_mm) or axial_error_mm < 0:
        raise InputDataError("needle placement errors must be zero or positive (mm)")
    geo = geometry or NotchGeometry.from_needle(needle, mode, **(notch_kwargs or {}))
    rng = np.random.default_rng(int(seed))
    centres, axes = draw_placements(point_ras, n, reg, lat, axial_error_mm, direction, rng)
    frac = notch_fractions(labels, code, centres, axes, geo, step_mm, cache=cache)
    hits = frac >= float(min_fraction) - 1e-12
    p = float(hits.mean())
    src = direction_source or (DIRECTION_AXIAL_UNIFORM if direction is None else DIRECTION_GIVEN)
    d = None if direction is None else (np.asarray(direction, float) / np.linalg.norm(direction)).tolist()
    res = HitProbability(target_name, str(region).upper(), [float(x) for x in np.asarray(point_ras, float).ravel()],
                         p, float(np.sqrt(p * (1.0 - p) / n)), float(frac.mean()), n, int(seed), float(min_fraction),
                         definition_text(min_fraction), reg.to_dict(), lat, float(axial_error_mm), d, src,
                         geo.to_dict(), float(step_mm), fractions=frac)
    logger.debug("hit probability %s at %s: %s", region, np.round(point_ras, 1).tolist(), res.summary())
    return res


def planned_hit_probabilities(labels: RasVolume, trajectories, mri_to_ct=None, registration_error=1.0, *,
                              needle=None, mode: str = "side-notch", n_samples: int = DEFAULT_SAMPLES,
                              seed: int = 0, min_fraction: float = DEFAULT_MIN_FRACTION) -> list:
    """Hit probability of each planned trajectory, with its own needle direction.

    ``trajectories``: planner trajectories (``region``/``target``, ``entry_ras``, ``target_ras`` in CT world,
    RAS mm) or dicts with those keys. ``labels``: the habitat map (MRI world); ``mri_to_ct``: the 4x4 RAS
    registration taking MRI-world points to CT world (None when the habitat map is in CT world).
    ``registration_error``: as for :func:`hit_probability`, in CT world (a callable gets the CT target
    point); it is carried into the habitat map's world with the registration. Returns one
    :class:`HitProbability` per trajectory, in order, or None where the region is not A, B or C.
    """
    m = np.eye(4) if mri_to_ct is None else np.asarray(mri_to_ct, float)
    ct_to_mri = np.linalg.inv(m)
    lin = ct_to_mri[:3, :3]
    geo = NotchGeometry.from_needle(needle, mode)
    cache: dict = {}
    out = []
    for t in trajectories:
        get = (lambda k: t.get(k)) if isinstance(t, dict) else (lambda k: getattr(t, k, None))
        region = str(get("region") or get("target") or "").upper()
        if region not in REGION_CODES:
            logger.info("trajectory %s: region '%s' is not a habitat; no hit probability", get("name"), region)
            out.append(None)
            continue
        entry = _finite_vector(get("entry_ras"), "trajectory entry")
        target = _finite_vector(get("target_ras"), "trajectory target")
        reg = registration_error_from(registration_error, target).rotated(lin)
        point = target @ lin.T + ct_to_mri[:3, 3]
        out.append(hit_probability(labels, region, point, registration_error=reg, needle=needle, mode=mode,
                                   direction=(target - entry) @ lin.T, direction_source=DIRECTION_PLANNED,
                                   n_samples=n_samples, seed=seed, min_fraction=min_fraction, geometry=geo,
                                   target_name=str(get("name") or region), cache=cache))
    return out

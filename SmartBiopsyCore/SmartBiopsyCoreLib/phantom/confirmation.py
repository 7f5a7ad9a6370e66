"""Phantom confirmation CTs: the sarcoma phantom scanned again with a biopsy needle in place.

For tests and benchmarks that need confirmation CTs the workflow did not make: the phantom's analytic
anatomy is rendered again (fresh scanner noise) after the patient moved, and a metal needle is drawn from
the skin entry to the actual tip. Everything here is simulated; the truth says where the needle really is.

Frames (RAS mm): the *planning frame* is the planning CT's world; the *confirmation frame* is the world of
the confirmation CT. Patient motion maps planning-frame tissue points ``x`` to confirmation-frame points
``y = R (x - c) + c + shift + b(x)``: a rigid part (rotation ``R`` about the tumour centre ``c`` plus
``shift``) and a breathing displacement ``b(x) = breathing_mm * exp(-|x - c|^2 / (2 sigma^2))`` that moves
the tumour but not the skin capsules. The scanner table does not move with the patient.

The needle is placed relative to the anatomy: its actual tip is the planned target plus a placement error
(depth along the planned direction, lateral across it) in the planning frame, carried into the
confirmation frame by the motion; the skin entry moves with the patient.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from SmartBiopsyCoreLib.geometry import RasVolume, perpendicular
from SmartBiopsyCoreLib.phantom import sarcoma as _s
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)

#: Highest value a 12-bit CT stores (HU); metal saturates here.
CT_MAX_HU = 3071.0


@dataclass
class PatientMotion:
    """Patient motion between the planning and a confirmation CT (see the module docstring; mm, degrees)."""

    shift_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    rotation_deg: float = 0.0
    rotation_axis: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    breathing_mm: np.ndarray = field(default_factory=lambda: np.zeros(3))
    breathing_sigma_mm: float = 35.0
    centre_ras: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self):
        self.shift_mm = np.asarray(self.shift_mm, float).reshape(3)
        self.rotation_axis = np.asarray(self.rotation_axis, float).reshape(3)
        self.breathing_mm = np.asarray(self.breathing_mm, float).reshape(3)
        self.centre_ras = np.asarray(self.centre_ras, float).reshape(3)

    @property
    def rigid(self) -> np.ndarray:
        """4x4 RAS matrix of the rigid part (planning frame -> confirmation frame)."""
        m = np.eye(4)
        r = _s._rotation(self.rotation_axis, np.radians(self.rotation_deg)) if self.rotation_deg else np.eye(3)
        m[:3, :3] = r
        m[:3, 3] = self.centre_ras - r @ self.centre_ras + self.shift_mm
        return m

    def breathing(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, float))
        if not np.any(self.breathing_mm):
            return np.zeros_like(x)
        w = np.exp(-((x - self.centre_ras) ** 2).sum(axis=1) / (2 * self.breathing_sigma_mm ** 2))
        return w[:, None] * self.breathing_mm[None, :]

    def planning_to_confirmation(self, x) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, float))
        m = self.rigid
        return x @ m[:3, :3].T + m[:3, 3] + self.breathing(x)

    def confirmation_to_planning(self, y, iterations: int = 30) -> np.ndarray:
        """Inverse of :meth:`planning_to_confirmation` (fixed-point iteration; the breathing field is smooth)."""
        y = np.atleast_2d(np.asarray(y, float))
        inv = np.linalg.inv(self.rigid)
        x = y @ inv[:3, :3].T + inv[:3, 3]
        if not np.any(self.breathing_mm):
            return x
        # only points near the tumour feel the breathing (weight < 1e-4 beyond 4.3 sigma)
        reach = 4.3 * self.breathing_sigma_mm + float(np.linalg.norm(self.breathing_mm))
        near = np.flatnonzero(((x - self.centre_ras) ** 2).sum(axis=1) < reach * reach)
        xn, yn = x[near], y[near]
        for _ in range(iterations):
            x_new = (yn - self.breathing(xn)) @ inv[:3, :3].T + inv[:3, 3]
            done = float(np.abs(x_new - xn).max(initial=0.0)) < 1e-4
            xn = x_new
            if done:
                break
        x[near] = xn
        return x

    def to_dict(self) -> dict:
        return {"shift_mm": self.shift_mm.tolist(), "rotation_deg": float(self.rotation_deg),
                "rotation_axis": self.rotation_axis.tolist(), "breathing_mm": self.breathing_mm.tolist(),
                "breathing_sigma_mm": float(self.breathing_sigma_mm), "centre_ras": self.centre_ras.tolist(),
                "rigid_planning_to_confirmation_ras": self.rigid.tolist()}


@dataclass
class ConfirmationTruth:
    """Where the phantom's needle really is, in both frames (RAS mm)."""

    target_name: str
    planned_entry_ras: np.ndarray
    planned_target_ras: np.ndarray
    tip_planning_ras: np.ndarray       #: actual tip, planning frame (the tissue the notch really samples)
    entry_planning_ras: np.ndarray
    tip_confirmation_ras: np.ndarray   #: actual tip as it appears in the confirmation CT
    entry_confirmation_ras: np.ndarray
    lateral_error_mm: float
    depth_error_mm: float
    outer_diameter_mm: float
    motion: PatientMotion
    capsules_confirmation_ras: np.ndarray

    @property
    def axis_planning(self) -> np.ndarray:
        a = self.tip_planning_ras - self.entry_planning_ras
        return a / np.linalg.norm(a)

    def to_dict(self) -> dict:
        v = lambda a: [float(x) for x in np.ravel(a)]  # noqa: E731
        return {"target_name": self.target_name, "phantom": True,
                "planned_entry_ras": v(self.planned_entry_ras), "planned_target_ras": v(self.planned_target_ras),
                "tip_planning_ras": v(self.tip_planning_ras), "entry_planning_ras": v(self.entry_planning_ras),
                "axis_planning": v(self.axis_planning),
                "tip_confirmation_ras": v(self.tip_confirmation_ras),
                "entry_confirmation_ras": v(self.entry_confirmation_ras),
                "lateral_error_mm": float(self.lateral_error_mm), "depth_error_mm": float(self.depth_error_mm),
                "outer_diameter_mm": float(self.outer_diameter_mm), "motion": self.motion.to_dict(),
                "capsules_confirmation_ras": np.asarray(self.capsules_confirmation_ras).tolist(),
                "units": "RAS mm"}


@dataclass
class PhantomConfirmation:
    ct: RasVolume
    truth: ConfirmationTruth


def placed_tip(entry, target, lateral_error_mm: float, depth_error_mm: float, lateral_direction, rng):
    """(tip, unit lateral direction): where a simulated needle's tip lands (RAS mm), ``depth_error_mm`` along the
    planned direction and ``lateral_error_mm`` perpendicular to it, towards ``lateral_direction`` (made
    perpendicular) or, when it is None, a direction drawn from ``rng`` (one uniform angle about the path)."""
    entry, target = np.asarray(entry, float), np.asarray(target, float)
    d = target - entry
    d = d / np.linalg.norm(d)
    if lateral_direction is None:
        u = perpendicular(d)
        w = np.cross(d, u)
        phi = rng.uniform(0, 2 * np.pi)
        lat = np.cos(phi) * u + np.sin(phi) * w
    else:
        lat = np.asarray(lateral_direction, float)
        lat = lat - (lat @ d) * d
        lat = lat / np.linalg.norm(lat)
    return target + depth_error_mm * d + lateral_error_mm * lat, lat


def _needle_occupancy(grid: RasVolume, start, end, radius_mm: float, supersample: int = 4):
    """(fraction over an index box, box (k0, k1, j0, j1, i0, i1)) of every voxel inside the solid cylinder."""
    p0, p1 = np.asarray(start, float), np.asarray(end, float)
    axis = p1 - p0
    length = float(np.linalg.norm(axis))
    axis /= length
    margin = radius_mm + 4.0 * float(grid.spacing.max())
    ijk = grid.ras_to_ijk_points(np.vstack([p0, p1]))
    pad = margin / grid.spacing
    lo = np.maximum(np.floor(ijk.min(axis=0) - pad).astype(int), 0)
    hi = np.minimum(np.ceil(ijk.max(axis=0) + pad).astype(int) + 1, np.array(grid.array.shape[::-1]))
    (i0, j0, k0), (i1, j1, k1) = lo, hi
    kk, jj, ii = np.meshgrid(np.arange(k0, k1), np.arange(j0, j1), np.arange(i0, i1), indexing="ij")
    n = int(supersample)
    off = (np.arange(n) + 0.5) / n - 0.5
    offs = np.stack(np.meshgrid(off, off, off, indexing="ij"), -1).reshape(-1, 3) @ grid.ijk_to_ras[:3, :3].T
    centres = grid.ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1).astype(float)) - p0
    t = centres @ axis
    radial = np.linalg.norm(centres - np.outer(t, axis), axis=1)
    half_diag = 0.5 * float(np.linalg.norm(grid.spacing))
    sd = np.maximum.reduce([radial - radius_mm, -t, t - length])
    frac = np.zeros(centres.shape[0], np.float32)
    frac[sd <= -half_diag] = 1.0
    cand = np.flatnonzero((sd <= half_diag) & (sd > -half_diag))
    for s in range(0, cand.size, 4000):
        c = cand[s:s + 4000]
        pts = centres[c][:, None, :] + offs[None, :, :]
        tt = pts @ axis
        rr2 = np.einsum("abc,abc->ab", pts, pts) - tt * tt
        frac[c] = ((tt >= 0) & (tt <= length) & (rr2 <= radius_mm ** 2)).mean(axis=1)
    return frac.reshape(kk.shape), (k0, k1, j0, j1, i0, i1)


def confirmation_ct(case, planned_entry_ras, planned_target_ras, *, target_name: str = "",
                    outer_diameter_mm: float = 1.8, lateral_error_mm: float = 0.0, depth_error_mm: float = 0.0,
                    lateral_direction=None, motion: PatientMotion | None = None, outside_length_mm: float = 15.0,
                    metal_hu: float = 12000.0, psf_sigma_mm: float = 0.5, ct_noise_hu: float = 10.0,
                    seed: int = 0, progress=None) -> PhantomConfirmation:
    """Scan the phantom ``case`` (a :class:`~SmartBiopsyCoreLib.phantom.sarcoma.PhantomCase`) again with the
    needle in place, on the planning CT's grid, after ``motion`` (none by default).

    ``planned_entry_ras``/``planned_target_ras``: the planned path in the planning frame. The actual tip is
    ``target + depth_error_mm * d + lateral_error_mm * u`` (``d`` the planned direction, ``u`` the unit
    ``lateral_direction`` made perpendicular to ``d``, random from ``seed`` when omitted). The needle
    (outer diameter ``outer_diameter_mm``) runs from ``outside_length_mm`` outside the moved entry to the
    moved tip; metal is ``metal_hu`` per fully filled voxel, blurred by a Gaussian PSF and clipped at
    3071 HU. Returns the CT (HU, int16, meta ``phantom_confirmation``) and its truth.
    """
    anat = case.anatomy
    if anat is None:
        raise ValueError("the phantom case has no anatomy; generate it with generate_phantom")
    motion = motion or PatientMotion(centre_ras=anat.tumour_centre)
    rng = np.random.default_rng(seed + 4242)
    entry = np.asarray(planned_entry_ras, float).reshape(3)
    target = np.asarray(planned_target_ras, float).reshape(3)
    tip_p, _lat = placed_tip(entry, target, lateral_error_mm, depth_error_mm, lateral_direction, rng)
    entry_c = motion.planning_to_confirmation(entry)[0]
    tip_c = motion.planning_to_confirmation(tip_p)[0]

    # anatomy after the motion: every confirmation-frame voxel shows the tissue of its planning-frame point
    grid = case.ct
    nk, nj, ni = grid.array.shape
    cls = np.empty((nk, nj, ni), np.int16)
    jj, ii = np.mgrid[0:nj, 0:ni]
    plane0 = grid.ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size)], 1).astype(float))
    dk = grid.ijk_to_ras[:3, 2]
    for k in range(nk):
        cls[k] = anat.classify(motion.confirmation_to_planning(plane0 + k * dk)).reshape(nj, ni)
        if progress and k % 20 == 0:
            progress(0.8 * k / nk, "confirmation CT anatomy")
    # the table stays where it is (same construction as the planning CT)
    table_top = -anat.body_b - 1.0
    ys = grid.ijk_to_ras_points(np.stack([np.zeros(nj), np.arange(nj), np.zeros(nj)], 1))[:, 1]
    shell = ((ys <= table_top) & (ys > table_top - 3)) | ((ys <= table_top - 22) & (ys > table_top - 25))
    core = (ys <= table_top - 3) & (ys > table_top - 22)
    cls[:, shell, :] = np.where(cls[:, shell, :] == _s.T["air"], _s.T["table"], cls[:, shell, :])
    hu = _s._PROPS[cls, _s.P_HU].astype(np.float32)
    hu[:, core, :] = np.where(cls[:, core, :] == _s.T["air"], -850.0, hu[:, core, :])
    caps_p = np.array([c for c, _ in anat.capsules])
    caps_c = motion.planning_to_confirmation(caps_p)
    _s._supersample_capsules(anat, grid, caps_c, [hu], [lambda c: _s._PROPS[c, _s.P_HU]], factor=(3, 3, 5),
                             world_fn=motion.confirmation_to_planning)
    hu = ndimage.gaussian_filter(hu, sigma=(0.35, 0.6, 0.6))
    # the needle
    axis = (tip_c - entry_c) / np.linalg.norm(tip_c - entry_c)
    frac, (k0, k1, j0, j1, i0, i1) = _needle_occupancy(grid, entry_c - outside_length_mm * axis, tip_c,
                                                       0.5 * outer_diameter_mm)
    si, sj, sk = grid.spacing
    frac = ndimage.gaussian_filter(frac, [np.hypot(psf_sigma_mm, 0.25 * sk) / sk, psf_sigma_mm / sj,
                                          psf_sigma_mm / si], mode="constant")
    sub = hu[k0:k1, j0:j1, i0:i1]
    hu[k0:k1, j0:j1, i0:i1] = sub * (1.0 - frac) + np.float32(metal_hu) * frac
    hu += rng.normal(0, ct_noise_hu, hu.shape).astype(np.float32)
    arr = np.clip(np.round(hu), -1024, CT_MAX_HU).astype(np.int16)
    vol = grid.with_array(arr, name=f"CT confirmation {target_name}".strip(), modality="CT", units="HU",
                          phantom_confirmation=True)
    truth = ConfirmationTruth(target_name=target_name, planned_entry_ras=entry, planned_target_ras=target,
                              tip_planning_ras=tip_p, entry_planning_ras=entry, tip_confirmation_ras=tip_c,
                              entry_confirmation_ras=entry_c, lateral_error_mm=float(lateral_error_mm),
                              depth_error_mm=float(depth_error_mm), outer_diameter_mm=float(outer_diameter_mm),
                              motion=motion, capsules_confirmation_ras=caps_c)
    if progress:
        progress(1.0, "confirmation CT ready")
    logger.info("phantom confirmation CT %s: tip %s (planning frame), shift %s mm", target_name,
                np.round(tip_p, 2).tolist(), motion.shift_mm.tolist())
    return PhantomConfirmation(vol, truth)


def write_confirmation(conf: PhantomConfirmation, out_dir, *, dicom: bool = True, seed: int = 0,
                       series_number: int = 20, minutes_after_planning: float = 20.0,
                       series_description: str | None = None, patient_id: str | None = None) -> dict:
    """Write a phantom confirmation CT as a DICOM series (``out_dir/dicom``) or NRRD (``out_dir/ct.nrrd``) and
    its truth (``out_dir/truth.json``). The series is acquired ``minutes_after_planning`` after the phantom's
    planning CT (which the phantom writes at 12:00) and described as a confirmation CT."""
    import datetime as _dt
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if dicom:
        from SmartBiopsyCoreLib.dataio.dicomio import write_dicom_series

        desc = series_description or f"CT confirmation needle {conf.truth.target_name}".strip()
        when = _dt.datetime(2024, 1, 1, 12, 0, 0) + _dt.timedelta(minutes=float(minutes_after_planning))
        write_dicom_series(conf.ct, out / "dicom", modality="CT", series_description=desc,
                           series_number=series_number, study_uid=_s._uid(seed, 1),
                           frame_of_reference_uid=_s._uid(seed, 3), patient_id=patient_id or f"PHANTOM{seed:04d}",
                           acquisition_datetime=when, uid_seed=f"phantom-{seed}-confirm-{series_number}")
        paths["dicom"] = str(out / "dicom")
    else:
        from SmartBiopsyCoreLib.dataio.imageio import save_image

        save_image(conf.ct, out / "ct.nrrd")
        paths["ct"] = str(out / "ct.nrrd")
    (out / "truth.json").write_text(jsonio.dumps(conf.truth.to_dict(), with_reasons=True, indent=1))
    paths["truth"] = str(out / "truth.json")
    return paths

"""Notch ROI: the tissue a core came from, as an oriented 3-D region, and the map values inside it.

Two modes, both defined in CT world (Slicer RAS, mm) from the detected needle (tip and axis, the axis
pointing in the insertion direction):

* ``"side-notch"`` - an oriented box over the notch of the imaged core needle: along the axis from
  ``tip - (notch offset + notch length)`` to ``tip - notch offset``; square cross-section as wide as the
  core (the needle's outer diameter unless a core diameter is given). For an end-cut needle the offset is 0
  and the box runs from the tip backwards over the specimen length.
* ``"tip-distal"`` - a cylinder starting at the tip and running ``length_mm`` (default 20 mm) further along
  the trajectory with diameter ``diameter_mm`` (default 2 mm): the tissue the fired needle will cut.

Sampling: the ROI is carried onto every map on the map's OWN grid (no resampling): each voxel of the map
near the ROI is supersampled (n x n x n points), the points are mapped map-world -> CT world with the
registration (4x4 RAS, MRI -> CT), and the fraction inside the ROI is the voxel's weight. Voxels deep inside
or far outside get weight 1 or 0 without supersampling. Statistics are weighted by those fractions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from SmartBiopsyCoreLib.dataio.transforms import validate_transform  # noqa: F401  (re-exported)
from SmartBiopsyCoreLib.geometry import RasVolume, perpendicular

from SmartBiopsyCoreLib.errors import InputDataError, SmartBiopsyError
from SmartBiopsyLib.sampling.needle import resolve_needle_geometry

logger = logging.getLogger(__name__)

SIDE_NOTCH = "side-notch"
TIP_DISTAL = "tip-distal"
MODES = (SIDE_NOTCH, TIP_DISTAL)

#: Units of the maps this project knows (by name prefix).
MAP_UNITS = {"adc": "1e-6 mm^2/s", "ff": "%", "ef": "%"}


def _unit(v, what="direction"):
    v = np.asarray(v, float).reshape(3)
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n == 0:
        raise InputDataError(f"the needle {what} has zero length or is not finite; detect the needle again")
    return v / n


@dataclass
class NotchROI:
    """An oriented box or cylinder in CT world (RAS mm).

    ``start_ras`` is the proximal end (towards the skin), ``end_ras`` the distal end; ``axis`` is the unit
    insertion direction (start -> end); ``u_axis``/``v_axis`` complete a right-handed frame.
    Box: ``half_widths_mm`` = (along u, along v); cylinder: ``radius_mm``.
    """

    mode: str
    shape: str  #: "box" or "cylinder"
    start_ras: np.ndarray
    axis: np.ndarray
    length_mm: float
    u_axis: np.ndarray
    v_axis: np.ndarray
    half_widths_mm: tuple = (0.0, 0.0)
    radius_mm: float = 0.0
    target_name: str = ""
    needle_name: str | None = None

    @property
    def end_ras(self) -> np.ndarray:
        return self.start_ras + self.length_mm * self.axis

    @property
    def centre_ras(self) -> np.ndarray:
        return self.start_ras + 0.5 * self.length_mm * self.axis

    @property
    def volume_mm3(self) -> float:
        """Analytic volume of the region (mm^3)."""
        if self.shape == "box":
            return 4.0 * self.half_widths_mm[0] * self.half_widths_mm[1] * self.length_mm
        return float(np.pi * self.radius_mm ** 2 * self.length_mm)

    @property
    def half_extent_mm(self) -> tuple[float, float]:
        """Half extents across the axis along u and v (mm)."""
        if self.shape == "box":
            return float(self.half_widths_mm[0]), float(self.half_widths_mm[1])
        return float(self.radius_mm), float(self.radius_mm)

    @property
    def frame(self) -> np.ndarray:
        """4x4 ROI-object -> RAS matrix: columns u, v, axis, translation = centre."""
        m = np.eye(4)
        m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = self.u_axis, self.v_axis, self.axis, self.centre_ras
        return m

    def corners_ras(self) -> np.ndarray:
        """The 8 corners (RAS mm) of the oriented bounding box (the box itself for side-notch)."""
        hu, hv = self.half_extent_mm
        out = []
        for s in (0.0, self.length_mm):
            for a in (-hu, hu):
                for b in (-hv, hv):
                    out.append(self.start_ras + s * self.axis + a * self.u_axis + b * self.v_axis)
        return np.array(out)

    def local(self, points_ras: np.ndarray) -> np.ndarray:
        """RAS points (N, 3) -> local (u, v, s) with s measured from ``start_ras`` along the axis."""
        rel = np.asarray(points_ras, float) - self.start_ras
        return np.stack([rel @ self.u_axis, rel @ self.v_axis, rel @ self.axis], axis=-1)

    def signed_distance_bound(self, points_ras: np.ndarray) -> np.ndarray:
        """A conservative signed distance (mm): > d means at least d outside, < -d at least d inside."""
        loc = self.local(points_ras)
        ds = np.maximum(-loc[..., 2], loc[..., 2] - self.length_mm)
        if self.shape == "box":
            du = np.abs(loc[..., 0]) - self.half_widths_mm[0]
            dv = np.abs(loc[..., 1]) - self.half_widths_mm[1]
            return np.maximum.reduce([ds, du, dv])
        dr = np.hypot(loc[..., 0], loc[..., 1]) - self.radius_mm
        return np.maximum(ds, dr)

    def contains(self, points_ras: np.ndarray) -> np.ndarray:
        """Boolean mask of points (RAS mm) inside the region (boundary included)."""
        return self.signed_distance_bound(points_ras) <= 0.0

    def to_dict(self) -> dict:
        vec = lambda v: [round(float(x), 4) for x in v]  # noqa: E731
        d = {
            "mode": self.mode,
            "shape": self.shape,
            "target_name": self.target_name,
            "needle": self.needle_name,
            "start_ras": vec(self.start_ras),
            "end_ras": vec(self.end_ras),
            "centre_ras": vec(self.centre_ras),
            "axis": vec(self.axis),
            "u_axis": vec(self.u_axis),
            "v_axis": vec(self.v_axis),
            "length_mm": round(float(self.length_mm), 4),
            "volume_mm3": round(self.volume_mm3, 4),
            "corners_ras": [vec(c) for c in self.corners_ras()],
            "frame": "RAS (CT world)",
        }
        if self.shape == "box":
            d["half_widths_mm"] = [float(self.half_widths_mm[0]), float(self.half_widths_mm[1])]
        else:
            d["radius_mm"] = float(self.radius_mm)
        return d


def notch_roi(tip_ras, axis, mode: str = SIDE_NOTCH, needle=None, *, notch_length_mm: float | None = None,
              notch_offset_mm: float | None = None, core_diameter_mm: float | None = None,
              tip_distal_length_mm: float = 20.0, tip_distal_diameter_mm: float = 2.0,
              target_name: str = "") -> NotchROI:
    """The notch ROI for a needle whose tip is at ``tip_ras`` (RAS mm) pointing along ``axis`` (insertion).

    ``needle``: a TrajectoryPlannerLib needle model / catalogue name / dict; explicit keyword values win.
    Side-notch mode needs the notch length and offset; tip-distal mode needs nothing from the needle.
    """
    mode = str(mode).lower().replace("_", "-")
    if mode not in MODES:
        raise InputDataError(f"notch mode '{mode}' is unknown; use '{SIDE_NOTCH}' or '{TIP_DISTAL}'")
    tip = np.asarray(tip_ras, float).reshape(3)
    if not np.all(np.isfinite(tip)):
        raise InputDataError("the needle tip is not a finite RAS point; detect the needle again")
    a = _unit(axis, "axis")
    u = perpendicular(a)
    v = np.cross(a, u)
    geo = resolve_needle_geometry(needle, notch_length_mm=notch_length_mm, notch_offset_mm=notch_offset_mm,
                                  core_diameter_mm=core_diameter_mm)
    if mode == TIP_DISTAL:
        if tip_distal_length_mm <= 0 or tip_distal_diameter_mm <= 0:
            raise InputDataError("the tip-distal region needs a positive length and diameter (mm)")
        return NotchROI(mode=mode, shape="cylinder", start_ras=tip, axis=a, length_mm=float(tip_distal_length_mm),
                        u_axis=u, v_axis=v, radius_mm=0.5 * float(tip_distal_diameter_mm), target_name=target_name,
                        needle_name=geo["name"])
    nl, no = geo["notch_length_mm"], geo["notch_offset_mm"]
    if nl is None or no is None:
        raise InputDataError("the side-notch region needs the needle's notch length and its offset from the tip; "
                             "choose a needle model or use the tip-distal mode")
    if nl <= 0 or no < 0:
        raise InputDataError(f"notch length {nl} mm and offset {no} mm are not valid (length > 0, offset >= 0); "
                             "check the needle model")
    half = 0.5 * geo["core_diameter_mm"]
    start = tip - (no + nl) * a
    return NotchROI(mode=mode, shape="box", start_ras=start, axis=a, length_mm=float(nl), u_axis=u, v_axis=v,
                    half_widths_mm=(half, half), target_name=target_name, needle_name=geo["name"])


def notch_roi_from_detection(detection, mode: str = SIDE_NOTCH, needle=None, **kwargs) -> NotchROI:
    """:func:`notch_roi` at a :class:`~SmartBiopsyLib.sampling.needle.NeedleDetection`'s tip and axis."""
    kwargs.setdefault("target_name", getattr(detection, "target_name", ""))
    return notch_roi(detection.tip_ras, detection.axis, mode, needle, **kwargs)


# ------------------------------------------------------------------------------------------------------
@dataclass
class MapStats:
    """Statistics of one map inside the notch ROI (map units; volumes in mm^3)."""

    name: str
    units: str
    mean: float
    median: float
    min: float
    max: float
    sd: float
    voxels_touched: int  #: map voxels that overlap the ROI at all
    voxels_effective: float  #: sum of fractional weights
    volume_mm3: float  #: voxels_effective x voxel volume
    coverage: float  #: sampled volume / analytic ROI volume (1 = the ROI lies wholly inside the map)
    n_nan: int = 0
    voxel_size_mm: tuple = ()

    def to_dict(self) -> dict:
        r = lambda x: None if x is None or not np.isfinite(x) else round(float(x), 4)  # noqa: E731
        return {"name": self.name, "units": self.units, "mean": r(self.mean), "median": r(self.median),
                "min": r(self.min), "max": r(self.max), "sd": r(self.sd), "voxels_touched": int(self.voxels_touched),
                "voxels_effective": r(self.voxels_effective), "volume_mm3": r(self.volume_mm3),
                "coverage": r(self.coverage), "n_nan": int(self.n_nan),
                "voxel_size_mm": [round(float(s), 4) for s in self.voxel_size_mm]}


@dataclass
class NotchValues:
    """Values of every co-registered map inside one notch ROI."""

    roi: NotchROI
    maps: dict  #: name -> MapStats
    mri_to_ct: np.ndarray | None
    supersample: int
    warnings: list = field(default_factory=list)

    @property
    def target_name(self) -> str:
        return self.roi.target_name

    def to_dict(self) -> dict:
        return {
            "target_name": self.roi.target_name,
            "roi": self.roi.to_dict(),
            "maps": {k: v.to_dict() for k, v in self.maps.items()},
            "mri_to_ct_ras": None if self.mri_to_ct is None else np.round(self.mri_to_ct, 8).tolist(),
            "supersample": int(self.supersample),
            "statistics": "weighted by the fraction of each map voxel inside the ROI; median = weighted median; "
                          "sd = weighted population SD; min/max over voxels at least half inside",
            "warnings": list(self.warnings),
        }


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """Weighted median: the value where the cumulative weight reaches half (midpoint when exactly half)."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cw = np.cumsum(w)
    half = 0.5 * cw[-1]
    i = int(np.searchsorted(cw, half))
    if i < v.size - 1 and np.isclose(cw[i], half, rtol=1e-12, atol=1e-12 * cw[-1]):
        return float(0.5 * (v[i] + v[i + 1]))
    return float(v[min(i, v.size - 1)])


def roi_fractions(roi: NotchROI, volume: RasVolume, map_to_ct: np.ndarray | None = None, supersample: int = 6):
    """Fraction of each map voxel inside ``roi``, on the map's own grid.

    ``map_to_ct``: 4x4 RAS transform taking the map's world points into the CT world where the ROI lives
    (None = the map already is in CT world). Returns ``(kji (N, 3) int array, fractions (N,))`` for the voxels
    with a non-zero fraction.
    """
    m2c = np.eye(4) if map_to_ct is None else np.asarray(map_to_ct, float)
    c2m = np.linalg.inv(m2c)
    corners_map = roi.corners_ras() @ c2m[:3, :3].T + c2m[:3, 3]
    ijk = volume.ras_to_ijk_points(corners_map)
    lo = np.floor(ijk.min(axis=0)).astype(int) - 1
    hi = np.ceil(ijk.max(axis=0)).astype(int) + 2
    nk, nj, ni = volume.array.shape
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [ni, nj, nk])
    if np.any(hi <= lo):
        return np.zeros((0, 3), int), np.zeros(0)
    ii, jj, kk = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), np.arange(lo[2], hi[2]), indexing="ij")
    ijk_c = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
    # voxel centre -> map world -> CT world in one affine
    vox_to_ct = m2c @ volume.ijk_to_ras
    centres = ijk_c @ vox_to_ct[:3, :3].T + vox_to_ct[:3, 3]
    half_diag = 0.5 * float(np.linalg.norm(np.linalg.norm(vox_to_ct[:3, :3], axis=0)))
    sd = roi.signed_distance_bound(centres)
    frac = np.zeros(len(ijk_c))
    frac[sd <= -half_diag] = 1.0
    cand = np.flatnonzero((sd > -half_diag) & (sd <= half_diag))
    if cand.size:
        # at least `supersample` points per voxel axis, and sub-steps no coarser than 1/6 of the ROI's
        # smallest width (thin ROIs in thick MRI slices)
        h = min(2 * min(roi.half_extent_mm), roi.length_mm) / 6.0
        vox_mm = np.linalg.norm(vox_to_ct[:3, :3], axis=0)
        n_ax = [int(min(32, max(int(supersample), np.ceil(s_mm / h)))) for s_mm in vox_mm]
        oi, oj, ok = np.meshgrid(*[(np.arange(n) + 0.5) / n - 0.5 for n in n_ax], indexing="ij")
        offs_ct = np.stack([oi.ravel(), oj.ravel(), ok.ravel()], axis=1) @ vox_to_ct[:3, :3].T
        chunk = max(1, 400000 // offs_ct.shape[0])
        for s in range(0, cand.size, chunk):
            c = cand[s:s + chunk]
            pts = centres[c][:, None, :] + offs_ct[None, :, :]
            frac[c] = roi.contains(pts).mean(axis=1)
    keep = frac > 0
    return ijk_c[keep][:, ::-1], frac[keep]


def sample_map(roi: NotchROI, volume: RasVolume, map_to_ct: np.ndarray | None = None, *, name: str | None = None,
               units: str | None = None, supersample: int = 6) -> MapStats:
    """Partial-volume-weighted statistics of ``volume`` inside ``roi`` (see :func:`roi_fractions`)."""
    name = name or volume.name
    kji, w = roi_fractions(roi, volume, map_to_ct, supersample)
    if units is None:
        units = volume.meta.get("units") or MAP_UNITS.get(name.lower().split("_")[0], "")
    spacing = tuple(float(s) for s in volume.spacing)
    if w.size == 0:
        return MapStats(name, units, *(float("nan"),) * 5, 0, 0.0, 0.0, 0.0, 0, spacing)
    vals = volume.array[tuple(kji.T)].astype(float)
    coverage = float(w.sum() * volume.voxel_volume_mm3 / roi.volume_mm3)
    finite = np.isfinite(vals)
    n_nan = int((~finite).sum())
    vals_f, w_f = vals[finite], w[finite]
    if vals_f.size == 0:
        return MapStats(name, units, *(float("nan"),) * 5, int(w.size), float(w.sum()),
                        float(w.sum() * volume.voxel_volume_mm3), coverage, n_nan, spacing)
    wsum = w_f.sum()
    mean = float((w_f * vals_f).sum() / wsum)
    sd = float(np.sqrt((w_f * (vals_f - mean) ** 2).sum() / wsum))
    major = w_f >= 0.5
    ext = vals_f[major] if major.any() else vals_f
    return MapStats(name=name, units=units, mean=mean, median=weighted_median(vals_f, w_f), min=float(ext.min()),
                    max=float(ext.max()), sd=sd, voxels_touched=int(w.size), voxels_effective=float(w.sum()),
                    volume_mm3=float(w.sum() * volume.voxel_volume_mm3), coverage=coverage, n_nan=n_nan,
                    voxel_size_mm=spacing)


def sample_maps(roi: NotchROI, maps: Mapping[str, RasVolume], mri_to_ct=None, *, supersample: int = 6,
                min_coverage: float = 0.95, progress: Callable[[float, str], None] | None = None,
                should_cancel: Callable[[], bool] | None = None) -> NotchValues:
    """Sample every map (name -> RasVolume on its own grid) inside ``roi`` (CT world).

    ``mri_to_ct``: the registration as a 4x4 RAS matrix mapping MRI-world points to CT-world points, shared
    by all maps (None when the maps are already in CT world). Refuses when the ROI falls (partly) outside a
    map after the transform, which usually means a wrong or inverted transform, and when an ADC map is
    evidently not in 1e-6 mm^2/s.
    """
    if not maps:
        raise InputDataError("no parameter maps were given to sample; load the ADC, FF and/or EF maps")
    m2c = None if mri_to_ct is None else validate_transform(mri_to_ct)
    label = f" for target {roi.target_name}" if roi.target_name else ""
    out: dict[str, MapStats] = {}
    warnings: list[str] = []
    for idx, (name, vol) in enumerate(maps.items()):
        if should_cancel and should_cancel():
            raise SmartBiopsyError("notch sampling was cancelled")
        if progress:
            progress(idx / len(maps), f"sampling {name}")
        if not isinstance(vol, RasVolume) or vol.array.size == 0:
            raise InputDataError(f"map '{name}' is empty or not a volume; load it again")
        st = sample_map(roi, vol, m2c, name=name, supersample=supersample)
        if st.coverage < min_coverage:
            hint = ("check that the transform maps MRI to CT (not CT to MRI) and belongs to this patient"
                    if m2c is not None else "check that the map is registered to the confirmation CT")
            raise InputDataError(f"the notch region{label} lies {100 * (1 - min(st.coverage, 1)):.0f}% outside map "
                                 f"'{name}' after applying the MRI->CT transform; {hint}")
        if st.n_nan and not np.isfinite(st.mean):
            raise InputDataError(f"map '{name}' has no valid values inside the notch region{label}; "
                                 "check the map (all voxels there are NaN)")
        if st.n_nan:
            warnings.append(f"{st.n_nan} voxel(s) of '{name}' in the notch region are NaN and were left out")
        key = name.lower()
        if key.startswith("adc") and np.isfinite(st.mean) and 0 < abs(st.mean) < 10:
            raise InputDataError(f"map '{name}' has values around {st.mean:.3g} inside the notch region; ADC must be "
                                 "in 1e-6 mm^2/s (typical tissue 500-3000) - rescale the map (x1000 from 1e-3 mm^2/s)")
        if (key.startswith("ff") or key.startswith("ef")) and np.isfinite(st.max) and 0 < st.max <= 1.0:
            warnings.append(f"map '{name}' is at most {st.max:.2f} in the notch region; FF/EF must be percent "
                            "(0-100), check it is not a fraction (0-1)")
        out[name] = st
    if progress:
        progress(1.0, "notch values ready")
    for w in warnings:
        logger.warning(w)
    logger.info("notch values%s: %s", label,
                ", ".join(f"{k} {v.mean:.1f}" for k, v in out.items() if np.isfinite(v.mean)))
    return NotchValues(roi=roi, maps=out, mri_to_ct=m2c, supersample=int(supersample), warnings=warnings)

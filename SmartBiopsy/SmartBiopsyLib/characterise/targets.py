"""One proposed biopsy target per habitat region, at the deepest point of the region's largest component.

Depth (mm) is the distance from the point to the region's edge: the Euclidean distance transform with the
grid's anisotropic voxel size, measured to the nearest voxel outside the component and corrected by half a
voxel to that voxel's face (the edge). A target is flagged "not safely targetable" when

    depth < predicted TRE (registration) + needle placement error (2 mm) + notch length / 2 (10 mm -> 5 mm)

because then a core could leave the region. The signature is the mean/SD of each map in a sphere (radius
5 mm) around the point. Points are RAS mm on the habitat grid's world.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from scipy import ndimage

from SmartBiopsyCoreLib.geometry import RasVolume
from SmartBiopsyCoreLib.errors import InputDataError

logger = logging.getLogger(__name__)

REGION_CODES = {"A": 1, "B": 2, "C": 3}


@dataclass
class Target:
    name: str
    region: str
    point_ras: list[float]
    signature: dict  # {"adc": {"mean":..,"sd":..,"n":..}, ...} in map units
    depth_mm: float
    predicted_tre_mm: float
    targetable: bool
    reasons: list[str] = field(default_factory=list)
    required_depth_mm: float = 0.0
    component_volume_ml: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def deepest_point(component: np.ndarray, spacing_kji) -> tuple[np.ndarray, float]:
    """(k, j, i) index of the deepest voxel of ``component`` and its depth in mm (distance to the edge)."""
    spacing_kji = np.asarray(spacing_kji, float)
    padded = np.pad(component, 1)
    dist, idx = ndimage.distance_transform_edt(padded, sampling=spacing_kji, return_indices=True)
    dist = dist[1:-1, 1:-1, 1:-1]
    best = float(dist.max())
    cands = np.argwhere(dist >= best - 1e-6)
    if len(cands) > 1:  # tie: the candidate closest to the component's centroid
        c = np.argwhere(component).mean(axis=0)
        cands = cands[np.argmin((((cands - c) * spacing_kji) ** 2).sum(axis=1))][None]
    p = cands[0]
    q = np.array([idx[d][tuple(p + 1)] for d in range(3)]) - 1  # nearest outside voxel (kji)
    delta = np.abs(q - p).astype(float)
    frac = 1.0 - 0.5 / max(delta.max(), 1.0)  # edge = face of the outside voxel, half a voxel nearer
    return p, best * frac


def sphere_signature(maps: Mapping[str, RasVolume], point_ras, radius_mm: float = 5.0) -> dict:
    """Mean, SD and voxel count of each map inside a sphere (RAS mm) around ``point_ras``; NaNs ignored."""
    out = {}
    for name, vol in maps.items():
        ijk = vol.ras_to_ijk_points(np.asarray(point_ras, float))[0]
        sp = vol.spacing
        r = np.ceil(radius_mm / sp).astype(int)
        c = np.round(ijk).astype(int)
        lo = np.maximum(c - r, 0)
        hi = np.minimum(c + r + 1, np.array(vol.array.shape[::-1]))
        if np.any(hi <= lo):
            out[name] = {"mean": float("nan"), "sd": float("nan"), "n": 0}
            continue
        ii, jj, kk = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
        pts = vol.ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1))
        inside = np.linalg.norm(pts - np.asarray(point_ras, float), axis=1) <= radius_mm
        vals = np.asarray(vol.array, float)[kk.ravel()[inside], jj.ravel()[inside], ii.ravel()[inside]]
        vals = vals[np.isfinite(vals)]
        out[name] = {"mean": float(vals.mean()) if vals.size else float("nan"),
                     "sd": float(vals.std(ddof=1)) if vals.size > 1 else float("nan"),
                     "n": int(vals.size), "units": vol.meta.get("units", "")}
    return out


def plan_targets(habitats: RasVolume, maps: Mapping[str, RasVolume] | None = None,
                 predicted_tre_mm: float | Callable | None = None, needle_error_mm: float = 2.0,
                 notch_length_mm: float = 10.0, sphere_radius_mm: float = 5.0) -> list[Target]:
    """One :class:`Target` per region present in the habitat label map (1 A, 2 B, 3 C).

    ``predicted_tre_mm``: a number, a callable ``f(point_ras) -> mm`` (e.g. the registration's predicted
    TRE), or None for 1 mm. ``maps``: {name: RasVolume} for the signature (any grid; sampled in RAS).
    A region that is absent gives no target (logged); an empty habitat map raises :class:`InputDataError`.
    """
    lab = np.asarray(habitats.array)
    if not np.isin(lab, list(REGION_CODES.values())).any():
        raise InputDataError("the habitat map has no region A, B or C; compute habitats on a tumour with solid tissue first")
    spacing_kji = habitats.spacing[::-1]
    targets = []
    for region, code in REGION_CODES.items():
        mask = lab == code
        if not mask.any():
            logger.warning("region %s is absent from the habitat map: no target proposed for it", region)
            continue
        comp = _largest_component(mask)
        box = np.argwhere(comp)
        lo = box.min(axis=0)
        sub = comp[tuple(slice(a, b + 1) for a, b in zip(lo, box.max(axis=0)))]
        kji, depth = deepest_point(sub, spacing_kji)
        kji = kji + lo
        point = habitats.kji_to_ras_points(kji[None])[0]
        if predicted_tre_mm is None:
            tre = 1.0
        elif callable(predicted_tre_mm):
            tre = float(predicted_tre_mm(point))
        else:
            tre = float(predicted_tre_mm)
        required = tre + needle_error_mm + notch_length_mm / 2.0
        ok = depth >= required
        reasons = [] if ok else [
            f"not safely targetable: depth {depth:.1f} mm is less than predicted TRE {tre:.1f} mm + needle error "
            f"{needle_error_mm:.1f} mm + half notch {notch_length_mm / 2.0:.1f} mm = {required:.1f} mm"]
        sig = sphere_signature(maps, point, sphere_radius_mm) if maps else {}
        t = Target(f"Target {region}", region, [float(v) for v in point], sig, float(depth), tre, bool(ok), reasons,
                   float(required), float(comp.sum() * habitats.voxel_volume_mm3 / 1000.0))
        logger.info("target %s at RAS %s, depth %.1f mm (needs %.1f)%s", region, np.round(point, 1).tolist(), depth,
                    required, "" if ok else " NOT targetable")
        targets.append(t)
    return targets


def write_targets_json(targets: list[Target], path) -> str:
    """Write ``{"targets": [...], "frame": "RAS", "units": "mm"}`` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(o):
        if isinstance(o, float) and not np.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    path.write_text(json.dumps({"frame": "RAS", "units": "mm", "targets": [clean(t.to_dict()) for t in targets]},
                               indent=2))
    return str(path)

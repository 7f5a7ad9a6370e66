"""One proposed biopsy target per habitat region: the candidate point with the highest hit probability.

Candidates: the deepest point of the region's largest component and the next deepest points spread over it
(greedy: each is the deepest voxel at least ``candidate_separation_mm`` from those already taken; up to
``n_candidates``). For each, the hit probability (:mod:`SmartBiopsyLib.characterise.hitprob`: at least 50 %
of the notch volume inside the region, Monte Carlo over registration and needle placement error, the needle
direction unknown before planning) is evaluated with the same random numbers; the target is the candidate
with the highest probability, and candidates within one Monte Carlo standard error of it count as tied and
go to the deepest. With ``hit_samples=0`` the deepest point is taken, as before.

Depth (mm) is the distance from the point to the region's edge: the Euclidean distance transform with the
grid's anisotropic voxel size, measured to the nearest voxel outside the component and corrected by half a
voxel to that voxel's face (the edge). A target is flagged "not safely targetable" when

    depth < predicted TRE (registration) + needle placement error (2 mm) + notch length / 2 (10 mm -> 5 mm)

because then a core could leave the region. The signature is the mean/SD of each map in a sphere (radius
5 mm) around the point. Points are RAS mm on the habitat grid's world.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from scipy import ndimage

from SmartBiopsyCoreLib.geometry import RasVolume
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.dataio import jsonio

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
    hit_probability: float | None = None  #: see ``hit_definition``; None when not evaluated
    hit_probability_se: float | None = None  #: Monte Carlo standard error of ``hit_probability``
    hit_definition: str = ""
    hit_model: dict = field(default_factory=dict)  #: error inputs, notch, direction, samples, seed (HitProbability)
    selection: str = "deepest point"
    candidates: list = field(default_factory=list)  #: [{"point_ras", "depth_mm", "hit_probability"}]

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


def _edge_depth(p, dist, idx) -> float:
    """Depth (mm) of voxel ``p`` (kji, unpadded) from the padded distance transform, to the outside voxel's face."""
    q = np.array([idx[d][tuple(p + 1)] for d in range(3)]) - 1  # nearest outside voxel (kji)
    delta = np.abs(q - p).astype(float)
    frac = 1.0 - 0.5 / max(delta.max(), 1.0)
    return float(dist[tuple(p + 1)]) * frac


def candidate_points(component: np.ndarray, spacing_kji, n: int = 8,
                     separation_mm: float = 5.0) -> list[tuple[np.ndarray, float]]:
    """Up to ``n`` candidate targets (kji index, depth mm) spread over ``component``.

    The first is :func:`deepest_point`; each next one is the deepest voxel at least ``separation_mm`` from all
    candidates taken so far (greedy non-maximum suppression on the depth map; equal depths, to 0.01 mm, go to
    the voxel nearest the component's centroid).
    """
    spacing_kji = np.asarray(spacing_kji, float)
    first, first_depth = deepest_point(component, spacing_kji)
    out = [(first, first_depth)]
    if n <= 1:
        return out
    padded = np.pad(component, 1)
    dist, idx = ndimage.distance_transform_edt(padded, sampling=spacing_kji, return_indices=True)
    vox = np.argwhere(component)
    depth = dist[1:-1, 1:-1, 1:-1][component]
    central = (((vox - vox.mean(axis=0)) * spacing_kji) ** 2).sum(axis=1)
    order = np.lexsort((central, -np.round(depth, 2)))  # deepest first, then nearest the centroid
    rank = np.empty(len(vox), np.int64)
    rank[order] = np.arange(len(vox))
    alive = np.ones(len(vox), bool)
    for p, _ in out:
        alive &= (((vox - p) * spacing_kji) ** 2).sum(axis=1) >= separation_mm ** 2
    while len(out) < n and alive.any():
        k = int(np.flatnonzero(alive)[np.argmin(rank[alive])])
        p = vox[k]
        out.append((p, _edge_depth(p, dist, idx)))
        alive &= (((vox - p) * spacing_kji) ** 2).sum(axis=1) >= separation_mm ** 2
    return out


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
                 predicted_tre_mm: float | Callable | None = None, needle_error_mm: float | None = None,
                 notch_length_mm: float = 10.0, sphere_radius_mm: float = 5.0, *, registration_error=None,
                 needle=None, notch_mode: str = "side-notch", direction=None, n_candidates: int = 8,
                 candidate_separation_mm: float = 5.0, hit_samples: int = 4000, seed: int = 0,
                 min_fraction: float = 0.5) -> list[Target]:
    """One :class:`Target` per region present in the habitat label map (1 A, 2 B, 3 C).

    ``predicted_tre_mm``: a number, a callable ``f(point_ras) -> mm`` (e.g. the registration's predicted
    RMS TRE), or None for 1 mm. ``maps``: {name: RasVolume} for the signature (any grid; sampled in RAS).
    ``needle_error_mm``: lateral needle placement error (RMS mm; None = the needle model's, 2 mm), used in the
    targetable-depth margin and the hit probability. ``registration_error``: the registration error at a
    target for the hit probability (a :class:`~SmartBiopsyLib.characterise.hitprob.RegistrationError`, a 3x3
    covariance in mm^2, an RMS in mm, or a callable ``f(point_ras)`` returning one; None = isotropic with the
    predicted RMS TRE). ``needle``/``notch_mode``: notch geometry (None = the default needle set, side notch).
    ``direction``: the needle direction in the habitat map's world, or None before planning (uniform over
    axial in-plane directions). ``hit_samples=0`` skips the hit probability and takes the deepest point.
    A region that is absent gives no target (logged); an empty habitat map raises :class:`InputDataError`.
    """
    from SmartBiopsyLib.characterise import hitprob

    if needle_error_mm is None:
        needle_error_mm = hitprob.lateral_error_for(needle)
    geometry = hitprob.NotchGeometry.from_needle(needle, notch_mode) if hit_samples else None
    cache: dict = {}
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
        def tre_at(point):
            if predicted_tre_mm is None:
                return 1.0
            if callable(predicted_tre_mm):
                return float(predicted_tre_mm(point))
            return float(predicted_tre_mm)

        cands = candidate_points(sub, spacing_kji, n_candidates if hit_samples else 1, candidate_separation_mm)
        hits, cand_info = [], []
        for c_kji, c_depth in cands:
            c_point = habitats.kji_to_ras_points((c_kji + lo)[None])[0]
            hp = None
            if hit_samples:
                reg = registration_error if registration_error is not None else tre_at
                hp = hitprob.hit_probability(habitats, region, c_point, registration_error=reg, needle=needle,
                                             mode=notch_mode, lateral_error_mm=needle_error_mm, direction=direction,
                                             n_samples=hit_samples, seed=seed, min_fraction=min_fraction,
                                             geometry=geometry, target_name=f"Target {region}", cache=cache)
            hits.append(hp)
            cand_info.append({"point_ras": [round(float(v), 3) for v in c_point], "depth_mm": round(float(c_depth), 3),
                              "hit_probability": None if hp is None else round(hp.probability, 5)})
        best = 0
        if hit_samples:
            top = max(range(len(cands)), key=lambda n: hits[n].probability)
            tol = hits[top].standard_error
            tied = [n for n in range(len(cands)) if hits[n].probability >= hits[top].probability - tol - 1e-12]
            best = max(tied, key=lambda n: (cands[n][1], -n))
        kji, depth = cands[best][0] + lo, cands[best][1]
        point = habitats.kji_to_ras_points(kji[None])[0]
        tre = tre_at(point)
        required = tre + needle_error_mm + notch_length_mm / 2.0
        ok = depth >= required
        reasons = [] if ok else [
            f"not safely targetable: depth {depth:.1f} mm is less than predicted TRE {tre:.1f} mm + needle error "
            f"{needle_error_mm:.1f} mm + half notch {notch_length_mm / 2.0:.1f} mm = {required:.1f} mm"]
        sig = sphere_signature(maps, point, sphere_radius_mm) if maps else {}
        t = Target(f"Target {region}", region, [float(v) for v in point], sig, float(depth), tre, bool(ok), reasons,
                   float(required), float(comp.sum() * habitats.voxel_volume_mm3 / 1000.0))
        hp = hits[best]
        if hp is not None:
            model = hp.to_dict()
            t.hit_probability, t.hit_probability_se = float(hp.probability), float(hp.standard_error)
            t.hit_definition = hp.definition
            t.hit_model = {k: model[k] for k in ("registration_error", "needle_lateral_rms_mm", "needle_lateral_model",
                                                 "needle_axial_sd_mm", "direction_ras", "direction_source", "notch",
                                                 "n_samples", "seed", "min_fraction", "quadrature_step_mm", "frame")}
            t.selection = (f"highest hit probability of {len(cands)} candidate(s) (the deepest point and the next "
                           f"deepest points at least {candidate_separation_mm:g} mm apart); candidates within one "
                           "Monte Carlo standard error count as tied and go to the deepest")
            t.candidates = cand_info
        logger.info("target %s at RAS %s, depth %.1f mm (needs %.1f)%s%s", region, np.round(point, 1).tolist(), depth,
                    required, "" if ok else " NOT targetable",
                    "" if hp is None else f", hit probability {hp.summary()}")
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

    path.write_text(jsonio.dumps({"frame": "RAS", "units": "mm", "targets": [clean(t.to_dict()) for t in targets]},
                               indent=2))
    return str(path)

"""Margin-aware straight-needle path planning on distance maps (RAS, mm).

How a plan is made (:func:`plan`):

1. The CT is cropped to the box the needle can reach around the targets (reach +
   ``distance_cap_mm``); body and skin are built there, then the candidate entries give the box every path
   passing the cheap constraints runs in, and the risk structures are built only in that box grown by the
   distance cap (farther voxels cannot change a capped reading) (:mod:`.risk`).
2. Distance maps: one exact Euclidean distance transform per distinct margin (structures with the same
   margin share a map: the distance to a union is the minimum distance), from the ``edt`` package
   (multi-threaded) or, when it is not installed (desktop Slicer), SimpleITK's Maurer transform with the same
   distances; in mm with the voxel spacing, capped. Each structure's map is needed on the path domain within
   the cap of it and needs its voxels within the cap of the domain: its box is the hull of both; structures of
   a group share a box only when that costs no more than apart, so far-apart structures (say the kidneys
   and the bowel) get small boxes instead of one spanning them (:func:`_map_boxes`; the minimum over the
   boxes is the group's distance). V starts at ``cap - largest margin`` (cap = ``distance_cap_mm``, at least
   the largest margin + 10 mm), so a group with margin m needs exact distances only up to
   ``cap - largest margin + m``: that is its cap. The combined field ``V = min_s(d_s - margin_s)`` and the margin group attaining it are kept on
   the path domain only.
3. Candidate entries: skin voxel centres, subsampled on a ``entry_spacing_mm`` grid (oblique mode), or the
   skin voxels within half a voxel of each target's axial plane, projected onto it (in-plane mode).
4. Every candidate path, entry -> fired needle tip (target + the needle's tip overshoot), is sampled every
   <= ``sample_step_mm`` and V is read by trilinear interpolation (vectorised; a coarse pass on every 8th
   sample first rejects paths the fine pass would reject anyway).

Clearance is measured to the structure voxels' surfaces: each voxel is a box of the voxel size, and the
clearance is the distance from the needle's outer surface to the nearest point of those boxes
(:data:`CLEARANCE_DEFINITION`, written into plan.json).

Acceptance bound. The maps hold exact Euclidean distances (mm) from voxel centres to the nearest structure
voxel centre; distances (and V) are 1-Lipschitz, so trilinear interpolation differs from the true value by
at most h = half the voxel diagonal (sum of trilinear weights x corner distance <= h), and between two
samples the value can dip by at most half the step. A voxel's box is at least (distance to its centre - h)
away. A path is accepted only if ``min(interpolated V) - h - step/2 - h >= needle outer radius``
(``clearance_error_bound_mm`` = h + step/2, ``clearance_surface_offset_mm`` = h), so every accepted path
truly keeps every margin from the needle's outer surface to the structures' voxel surfaces. The price is
that paths whose true excess is below ``3h + step/2`` may be rejected.

Reported clearances (per structure, for the returned trajectories) are exact distances from the path samples
to the nearest voxel box (KD-tree of boundary voxel centres, then the box distance of every candidate within
h of the nearest centre), minus step/2 and the needle's outer radius: a lower bound on the
surface-to-structure distance, at most step/2 below it.

Angle to the axial plane: angle between the path and the CT's slice plane (normal = i x j axis of the CT),
so gantry-tilted CTs are handled. Rejections are counted as a funnel in this order: needle_length,
angle_to_axial, entry_region, leaves_body, then the structure with the worst margin violation.

Score (higher is better, 0..1): weighted mean of (1 - length / reach), min(margin excess / clearance_ref, 1)
and (1 - angle / 90 deg); weights in :class:`PlanSettings`. Per target the top-N by score are returned,
with entries at least ``min_entry_separation_mm`` apart.

Shared entry (definition): one skin puncture from which a separate straight path reaches each target, every
path meeting all constraints on its own; clinically the coaxial introducer is withdrawn to the subcutaneous
tissue and redirected through the same puncture (no pivot inside the tumour is assumed). The entry with
the best mean score is chosen; the trade-off per target (score loss, length increase, loss of margin
excess vs the target's individual best path) and the fan angle are reported.

Pooled planning grid (``planning_spacing_mm``): for very fine CTs the masks can be max-pooled to a coarser
grid (bone/body from the block maximum of HU, gas from the block minimum, user labels "any voxel"), which
is conservative; a pooled voxel's box contains its fine voxels' boxes, so the surface offset of the pooled
grid covers the pooling (the pooling offset is only added when measuring to centres).

Pooled screening (``PlanSettings.screening = "pooled"``, :mod:`.screening`): no full-resolution maps; 2x pooled
maps bound every path's reading, and the paths that can reach the ranked list, the shortest safe length or the
shared entry are re-scored exactly from the structures' KD-trees: the same trajectories and scores (to float32
precision); the funnel and skin map then come from the screening bounds (stated in plan.json).

Needle too short: when every candidate within reach fails and some lie beyond it, the plan is repeated with
a needle ``extra_reach_mm`` longer and the error states the shortest safe length.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from SmartBiopsyCoreLib.body import BODY_HU_THRESHOLD
from SmartBiopsyCoreLib.geometry import RasVolume

from TrajectoryPlannerLib.errors import TrajectoryPlannerError
from TrajectoryPlannerLib.planning.needles import DEFAULT_NEEDLE, NeedleModel, get_needle
from TrajectoryPlannerLib.planning.risk import EntryExclusion, RiskModel, build_risk_model, crop_volume

logger = logging.getLogger(__name__)

#: What ``clearance_mm`` means (written into plan.json).
CLEARANCE_DEFINITION = (
    "distance (mm) from the needle's outer surface (axis from the skin entry to the fired tip) to the nearest "
    "point of the structure's voxels, each voxel taken as a box of the voxel size (voxel surfaces, not centres); "
    "exact at path samples <= sample_step_mm apart, reported minus half the step, so a lower bound at most "
    "half a step below the true value. A path is accepted only if the distance-map reading minus "
    "clearance_error_bound_mm minus clearance_surface_offset_mm clears every margin.")
#: Clearance to voxel surfaces (True, the definition above) or, for comparisons only, to voxel centres.
CLEARANCE_TO_SURFACE = True
COARSE_EVERY = 8  # coarse pass reads every 8th fine sample (4 mm at 0.5 mm steps)
MERGE_SLAB_VOXELS = 1 << 20  # temporaries of the margin-field merge (about 5 MB)


class NoSafePathError(TrajectoryPlannerError):
    """No candidate path satisfies all constraints; ``rejections`` holds the funnel counts."""

    def __init__(self, message: str, rejections: dict | None = None, needed_length_mm: float | None = None):
        super().__init__(message)
        self.rejections = rejections or {}
        self.needed_length_mm = needed_length_mm


# ------------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A biopsy target: specimen-centre point in RAS (mm)."""

    name: str
    point_ras: tuple
    region: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "region": self.region, "point_ras": [float(v) for v in self.point_ras]}


@dataclass
class PlanSettings:
    """Constraints and scoring. Angles in degrees, lengths in mm."""

    mode: str = "oblique"  # "oblique" (double-oblique, robot) or "in-plane" (gantry-aligned freehand CT)
    max_angle_deg: float = 60.0  # oblique mode: largest angle to the axial plane
    in_plane_tolerance_deg: float = 1.0  # in-plane mode
    sample_step_mm: float = 0.5
    entry_spacing_mm: float = 3.0  # skin subsampling (oblique); in-plane uses half of it
    skin_skip_mm: float = 2.0  # the body check starts this deep below the entry
    top_n: int = 5
    min_entry_separation_mm: float = 10.0  # between ranked entries of one target
    weight_length: float = 0.4
    weight_clearance: float = 0.4
    weight_obliquity: float = 0.2
    clearance_ref_mm: float = 10.0  # margin excess at which the clearance term saturates
    distance_cap_mm: float = 30.0
    extra_reach_mm: float = 40.0  # how far beyond the needle's reach to look when explaining "too short"
    shared_entry: bool = True
    allow_partial: bool = False  # False: a target without a safe path raises NoSafePathError
    threads: int | None = None
    planning_spacing_mm: float | None = None  # None: plan on the CT grid; else max-pool masks to about this
    # "exact": full-resolution distance maps; "pooled": 2x pooled maps screen, exact re-scoring of what the
    # ranking needs (same trajectories and scores, faster; the skin map counts only proven-safe entries)
    screening: str = "exact"

    def __post_init__(self):
        if self.mode not in ("oblique", "in-plane"):
            raise TrajectoryPlannerError(f"planning mode '{self.mode}' is unknown; use 'oblique' or 'in-plane'")
        if not 0 < self.sample_step_mm <= 0.5:
            raise TrajectoryPlannerError("the path sampling step must be in (0, 0.5] mm")
        if not 0 <= self.max_angle_deg <= 90:
            raise TrajectoryPlannerError("the maximum angle to the axial plane must be between 0 and 90 degrees")
        if self.screening not in ("exact", "pooled"):
            raise TrajectoryPlannerError(f"screening '{self.screening}' is unknown; use 'exact' or 'pooled'")
        if min(self.weight_length, self.weight_clearance, self.weight_obliquity) < 0 or \
                self.weight_length + self.weight_clearance + self.weight_obliquity <= 0:
            raise TrajectoryPlannerError("score weights must be non-negative and not all zero")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Trajectory:
    """One straight needle path. Points RAS mm; clearance = needle outer surface to structure (lower bound)."""

    name: str
    target: str
    region: str
    entry_ras: np.ndarray
    target_ras: np.ndarray
    needle: str
    length_mm: float
    clearance_mm: dict
    margin_mm: dict
    angle_to_axial_deg: float
    score: float
    rank: int
    tip_ras: np.ndarray | None = None

    @property
    def min_margin_excess_mm(self) -> float:
        return min((self.clearance_mm[k] - self.margin_mm[k] for k in self.clearance_mm), default=math.inf)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "target": self.target, "region": self.region,
            "entry_ras": [round(float(v), 3) for v in self.entry_ras],
            "target_ras": [round(float(v), 3) for v in self.target_ras],
            "tip_ras": None if self.tip_ras is None else [round(float(v), 3) for v in self.tip_ras],
            "needle": self.needle, "length_mm": round(float(self.length_mm), 2),
            "clearance_mm": {k: round(float(v), 2) for k, v in self.clearance_mm.items()},
            "margin_mm": {k: float(v) for k, v in self.margin_mm.items()},
            "angle_to_axial_deg": round(float(self.angle_to_axial_deg), 2),
            "score": round(float(self.score), 4), "rank": int(self.rank),
        }


@dataclass
class SharedEntryPlan:
    """One skin puncture, three straight paths (a fan redirected through the same puncture)."""

    entry_ras: np.ndarray
    trajectories: list
    tradeoff: dict  # per target: score/length/clearance change vs the individual best
    fan_angle_deg: float
    definition: str = ("one skin entry point; the coaxial introducer is redirected from the subcutaneous "
                       "tissue along a separate straight path to each target, every path satisfying all "
                       "constraints on its own")

    def to_dict(self) -> dict:
        return {"entry_ras": [round(float(v), 3) for v in self.entry_ras],
                "trajectories": [t.to_dict() for t in self.trajectories],
                "tradeoff": self.tradeoff, "fan_angle_deg": round(float(self.fan_angle_deg), 2),
                "mean_score": round(float(np.mean([t.score for t in self.trajectories])), 4),
                "definition": self.definition}


@dataclass
class CandidateEval:
    """Per-candidate arrays of one target's evaluation (entries RAS mm)."""

    entries: np.ndarray
    length_mm: np.ndarray
    angle_deg: np.ndarray
    reason: np.ndarray  # int code: -1 valid, else index into reason_names
    reason_names: list
    min_excess_mm: np.ndarray  # conservative min over structures of clearance - margin (nan if not evaluated)
    score: np.ndarray
    paths_evaluated: int = 0

    @property
    def valid(self) -> np.ndarray:
        return self.reason < 0

    def funnel(self) -> dict:
        counts = np.bincount(self.reason[self.reason >= 0], minlength=len(self.reason_names))
        return {n: int(c) for n, c in zip(self.reason_names, counts) if c}


@dataclass
class PlanResult:
    targets: list
    trajectories: list
    shared_entry: SharedEntryPlan | None
    rejections: dict  # target -> {reason: count} (funnel)
    candidates: dict  # target -> number of skin entries considered
    failures: dict  # target -> message (only with allow_partial)
    needle: NeedleModel
    settings: PlanSettings
    error_bound_mm: float
    risk: dict
    timings_s: dict
    skin_points_ras: np.ndarray = field(default=None, repr=False)
    skin_clearance_mm: np.ndarray = field(default=None, repr=False)
    skin_targets_reachable: np.ndarray = field(default=None, repr=False)
    shared_entry_note: str = ""
    shortest_safe_length_mm: dict = field(default_factory=dict)
    body: RasVolume | None = field(default=None, repr=False)  # body mask (uint8) on the planning grid
    surface_offset_mm: float = 0.0  # half the planning voxel diagonal: voxel centre -> voxel surface
    unresolved: dict = field(default_factory=dict)  # pooled screening: target -> paths neither proven nor rejected

    def to_dict(self) -> dict:
        return {
            "shortest_safe_length_mm": {k: round(v, 2) for k, v in self.shortest_safe_length_mm.items()},
            "targets": [t.to_dict() for t in self.targets],
            "trajectories": [t.to_dict() for t in self.trajectories],
            "shared_entry": None if self.shared_entry is None else self.shared_entry.to_dict(),
            "shared_entry_note": self.shared_entry_note,
            "rejections": self.rejections, "candidates": self.candidates, "failures": self.failures,
            "needle": self.needle.to_dict(), "settings": self.settings.to_dict(),
            "clearance_error_bound_mm": round(float(self.error_bound_mm), 3),
            "clearance_surface_offset_mm": round(float(self.surface_offset_mm), 3),
            "clearance_definition": CLEARANCE_DEFINITION,
            "risk": self.risk, "timings_s": {k: round(float(v), 3) for k, v in self.timings_s.items()},
            **self._screening_dict(),
        }

    def _screening_dict(self) -> dict:
        """plan.json's ``screening`` entry (what the funnel and skin map mean) when pooled screening was used."""
        if self.settings.screening != "pooled":
            return {}
        from TrajectoryPlannerLib.planning.screening import SCREENING_NOTE

        return {"screening": {"method": "pooled", "definition": SCREENING_NOTE,
                              "unresolved_near_margin": dict(self.unresolved)}}


# ------------------------------------------------------------------------------------------------
_EDT_NOTE_LOGGED = False


def _edt_module():
    """The ``edt`` package, or None (desktop Slicer does not bundle it; the SimpleITK path is then used)."""
    global _EDT_NOTE_LOGGED
    try:
        import edt
    except ImportError:
        if not _EDT_NOTE_LOGGED:
            logger.info("the 'edt' package is not installed; distance maps use SimpleITK (same distances, slower)")
            _EDT_NOTE_LOGGED = True
        return None
    return edt


def distance_map(mask: np.ndarray, spacing_kji, threads: int | None = None, backend: str = "auto") -> np.ndarray:
    """Exact Euclidean distance (mm, float32) from every voxel centre to the nearest voxel centre of ``mask``
    (bool, k, j, i), 0 inside; ``spacing_kji`` in mm. Voxels beyond the array are not structure.

    ``backend``: "edt" (the ``edt`` package, multi-threaded), "sitk" (SimpleITK Maurer, the fallback used
    when ``edt`` is absent) or "auto". Both give the same distances (to float32 precision).
    """
    sp = tuple(float(v) for v in spacing_kji)
    workers = max(1, int(threads or os.cpu_count() or 1))
    mod = _edt_module() if backend in ("auto", "edt") else None
    if backend == "edt" and mod is None:
        raise TrajectoryPlannerError("the 'edt' package is not installed; install it or use the SimpleITK distance maps")
    if mod is not None:
        return np.asarray(mod.edt(np.logical_not(mask).view(np.uint8), anisotropy=sp, black_border=False,
                                  parallel=workers), np.float32)
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8))
    img.SetSpacing(sp[::-1])
    f = sitk.SignedMaurerDistanceMapImageFilter()
    f.SetInsideIsPositive(False)
    f.SetSquaredDistance(False)
    f.SetUseImageSpacing(True)
    f.SetNumberOfThreads(workers)
    d = sitk.GetArrayFromImage(f.Execute(img))
    np.maximum(d, np.float32(0.0), out=d)  # the signed map is negative inside; the unsigned one is 0 there
    return d


def _bbox(mask: np.ndarray):
    """(lo, hi) k, j, i index box of the True voxels, or None (two passes: slices, then one (j, i) plane)."""
    kk = np.flatnonzero(mask.any(axis=(1, 2)))
    if len(kk) == 0:
        return None
    plane = mask[kk[0]:kk[-1] + 1].any(axis=0)
    jj, ii = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return np.array([kk[0], jj[0], ii[0]]), np.array([kk[-1] + 1, jj[-1] + 1, ii[-1] + 1])


def _voxel_kji(mask: np.ndarray) -> np.ndarray:
    """(N, 3) (k, j, i) indices of the True voxels in C order: ``np.argwhere(mask)`` without its slow N-d path."""
    return np.stack(np.unravel_index(np.flatnonzero(mask), mask.shape), axis=1)


def _map_boxes(boxes, pad, dlo, dhi, shape):
    """Boxes [(lo, hi, member indices)] on which one margin group's distance maps are computed.

    ``boxes``: (lo, hi) k, j, i box of each structure of the group; ``pad``: voxels covering the group's cap;
    [dlo, dhi): the path domain. A structure's map is needed on the domain within ``pad`` of it (output) and
    needs the structure's voxels within ``pad`` of the domain (sources): its box is the hull of both (a voxel
    beyond it is farther than the cap from every domain voxel the map is read at). Structures whose boxes
    cost less computed together than apart (the hull's volume is at most the sum) share one box; far-apart
    structures get their own, smaller boxes (the distance to a union is the minimum of the distances).
    """
    def own(lo, hi):
        olo, ohi = np.maximum(dlo, lo - pad), np.minimum(dhi, hi + pad)  # output: domain near the structure
        slo, shi = np.maximum(lo, dlo - pad), np.minimum(hi, dhi + pad)  # sources: structure near the domain
        return np.maximum(np.minimum(olo, slo), 0), np.minimum(np.maximum(ohi, shi), shape), np.all(ohi > olo)

    def vol(lo, hi):
        return float(np.prod(np.maximum(hi - lo, 0)))

    items = []
    for i, (lo, hi) in enumerate(boxes):
        blo, bhi, needed = own(np.asarray(lo), np.asarray(hi))
        if needed:  # else the structure is farther than the cap from every path
            items.append((blo, bhi, [i]))
    merged = True
    while merged and len(items) > 1:
        merged = False
        for a in range(len(items)):
            for b in range(a + 1, len(items)):
                lo, hi = np.minimum(items[a][0], items[b][0]), np.maximum(items[a][1], items[b][1])
                if vol(lo, hi) <= vol(*items[a][:2]) + vol(*items[b][:2]):
                    items[a] = (lo, hi, sorted(items[a][2] + items[b][2]))
                    del items[b]
                    merged = True
                    break
            if merged:
                break
    return items


def box_distance(points_mm: np.ndarray, centres_mm: np.ndarray, half_size_mm) -> np.ndarray:
    """Distance (mm) from points (N, 3) to axis-aligned boxes with the given centres (N, K, 3) and half sizes."""
    g = np.abs(np.asarray(points_mm)[:, None, :] - centres_mm) - np.asarray(half_size_mm, float)
    np.maximum(g, 0.0, out=g)
    return np.sqrt((g * g).sum(axis=-1))


class DistanceMaps:
    """Capped distance maps (mm) per margin group, the combined margin field, exact per-structure distances.

    Structures sharing a margin share one map (the distance to a union is the minimum of the distances), so
    the combined field ``V = min_s(d_s - margin_s)`` needs one map per distinct margin. The maps are exact
    Euclidean distance transforms in mm (voxel centre to nearest structure voxel centre, 0 inside): the
    ``edt`` package (multi-threaded) when installed, else SimpleITK's Maurer transform (the same distances
    to float precision; :func:`distance_map`). Clearance is measured to the structure voxels' *surfaces*
    (each voxel a box of the voxel size): the distance to a voxel's box is at least the distance to its centre
    minus half the voxel diagonal, so ``surface_offset_mm`` (= half the diagonal) is subtracted from V through
    the acceptance threshold. Per-structure clearances of the returned trajectories are exact distances to
    the voxel boxes (KD-tree of each structure's boundary voxel centres), not read from the maps.
    """

    def __init__(self, risk: RiskModel, cap_mm: float = 30.0, threads: int | None = None,
                 pool_offset_mm: float = 0.0, domain: tuple | None = None, to_surface: bool = True,
                 build_maps: bool = True, prebuild_trees: bool = False):
        """``pool_offset_mm``: when the masks were max-pooled from a finer grid, the largest distance from a
        pooled voxel centre to a fine voxel centre inside it (reported; with ``to_surface`` it needs no
        separate term, because a pooled voxel's box contains the boxes of its fine voxels).
        ``domain``: (lo, hi) k, j, i box where paths will be sampled; maps are computed on it grown by the cap
        (values there are exact up to the cap) and the combined field is stored on the domain only (outside
        it readings take the nearest domain value and are not valid). ``to_surface=False`` measures to voxel
        centres (the definition before surfaces; kept for comparisons in the benchmark).
        ``build_maps=False``: no distance maps, no combined field (``combined``/``argmin`` None); only the exact
        per-structure distances (KD-trees) are available (pooled screening, :mod:`.screening`).
        ``prebuild_trees``: build the structures' KD-trees (:meth:`exact_distance`) in a background thread while
        the distance maps are computed (the planner's returned trajectories need them all)."""
        self.grid = risk.grid
        self.shape = risk.grid.array.shape
        self.spacing_kji = risk.grid.spacing[::-1].astype(float)
        self.names = [s.name for s in risk.structures]
        self.margins = {s.name: float(s.margin_mm) for s in risk.structures}
        self.masks = {s.name: s.mask for s in risk.structures}
        self.cap = float(max(cap_mm, max(self.margins.values(), default=0.0) + 10.0))
        self.half_diagonal_mm = 0.5 * float(np.linalg.norm(self.spacing_kji))
        self.to_surface = bool(to_surface)
        self.surface_offset_mm = self.half_diagonal_mm if to_surface else 0.0
        self.pool_offset_mm = float(pool_offset_mm)
        margins = sorted(set(self.margins.values()))
        self.groups: list[tuple[float, list[str]]] = [(m, [n for n in self.names if self.margins[n] == m])
                                                      for m in margins]
        self.pieces: list[list[tuple[np.ndarray, np.ndarray]]] = []  # per group: [(offset kji, capped map)]
        self._maps = None  # per group: one (offset kji, capped map), assembled from the pieces on first use
        max_m = margins[-1] if margins else 0.0
        # V starts at cap - max_m; a group with margin m lowers it only where its distance is below
        # cap - max_m + m, so its map needs exact values (and its box the structures) only up to that
        self.group_caps = [self.cap - max_m + m for m in margins]
        if domain is None:
            dlo, dhi = np.zeros(3, int), np.array(self.shape)
        else:
            dlo = np.maximum(np.asarray(domain[0], int), 0)
            dhi = np.maximum(np.minimum(np.asarray(domain[1], int), self.shape), dlo + 1)
        self.domain_lo = dlo
        dshape = tuple(int(v) for v in dhi - dlo)
        self.combined = np.full(dshape, self.cap - max_m, np.float32) if build_maps else None  # on the domain box
        self.argmin = np.full(dshape, len(margins) - 1 if margins else 0, np.uint8) if build_maps else None
        boxes = {n: _bbox(self.masks[n]) for n in self.names}
        self.boxes = boxes  # (lo, hi) k, j, i box of each structure, or None
        self._trees: dict = {}
        self._lock = threading.Lock()
        if prebuild_trees:
            self.build_trees_async()
        self._scratch = None  # reused for each piece's V and comparison on the domain (no fresh pages per piece)
        for gi, (margin, names) in enumerate(self.groups if build_maps else []):
            gcap = self.group_caps[gi]
            pad = np.ceil(gcap / self.spacing_kji).astype(int) + 1
            present = [n for n in names if boxes[n] is not None]
            pieces = []
            self.pieces.append(pieces)
            for lo, hi, members in _map_boxes([boxes[n] for n in present], pad, dlo, dhi, self.shape):
                box = tuple(slice(a, b) for a, b in zip(lo, hi))
                mask = self.masks[present[members[0]]][box].copy()
                for m in members[1:]:
                    mask |= self.masks[present[m]][box]
                d = distance_map(mask, self.spacing_kji, threads)
                del mask
                np.minimum(d, np.float32(gcap), out=d)
                pieces.append((lo, d))
                self._merge(gi, margin, lo, hi, d, dlo, dhi)
        self._scratch = None
        self.body = risk.body.view(np.uint8) if risk.body.dtype == bool else risk.body.astype(np.uint8)

    def _merge(self, gi, margin, lo, hi, d, dlo, dhi):
        """Merge one map piece of group ``gi`` (box [lo, hi)) into the combined field and its argmin, slab by slab
        of k (small, reused temporaries)."""
        olo, ohi = np.maximum(lo, dlo), np.minimum(hi, dhi)  # where the map and the domain overlap
        if np.any(ohi <= olo):
            return
        plane = int((ohi[1] - olo[1]) * (ohi[2] - olo[2]))
        step = max(1, MERGE_SLAB_VOXELS // plane)
        if self._scratch is None or self._scratch[0].size < step * plane:
            self._scratch = (np.empty(step * plane, np.float32), np.empty(step * plane, bool))
        m = np.float32(margin)
        g = np.uint8(gi)
        for k0 in range(int(olo[0]), int(ohi[0]), step):
            k1 = min(k0 + step, int(ohi[0]))
            shape = (k1 - k0, int(ohi[1] - olo[1]), int(ohi[2] - olo[2]))
            n = shape[0] * plane
            src = d[k0 - lo[0]:k1 - lo[0], olo[1] - lo[1]:ohi[1] - lo[1], olo[2] - lo[2]:ohi[2] - lo[2]]
            dsl = (slice(k0 - dlo[0], k1 - dlo[0]), slice(olo[1] - dlo[1], ohi[1] - dlo[1]),
                   slice(olo[2] - dlo[2], ohi[2] - dlo[2]))
            v = np.subtract(src, m, out=self._scratch[0][:n].reshape(shape))
            view = self.combined[dsl]
            better = np.less(v, view, out=self._scratch[1][:n].reshape(shape))
            np.minimum(view, v, out=view)  # = v where better, else unchanged (equal values are equal)
            np.copyto(self.argmin[dsl], g, where=better)

    @property
    def maps(self) -> list:
        """Per margin group: (offset kji, capped distance map mm) on the box around all its pieces (cap outside
        them); exact up to the group's cap on the path domain."""
        if self._maps is None:
            out = []
            for gi, pieces in enumerate(self.pieces):
                gcap = np.float32(self.group_caps[gi])
                if not pieces:  # the structures are farther than the cap from every path
                    out.append((np.zeros(3, int), np.full((1, 1, 1), gcap, np.float32)))
                    continue
                if len(pieces) == 1:
                    out.append(pieces[0])
                    continue
                lo = np.min([p[0] for p in pieces], axis=0)
                hi = np.max([p[0] + p[1].shape for p in pieces], axis=0)
                d = np.full(tuple(int(v) for v in hi - lo), gcap, np.float32)
                for plo, pd in pieces:
                    view = d[tuple(slice(a - b, a - b + n) for a, b, n in zip(plo, lo, pd.shape))]
                    np.minimum(view, pd, out=view)
                out.append((lo, d))
            self._maps = out
        return self._maps

    # sampling ------------------------------------------------------------------------------------
    def ras_to_kji(self, ras: np.ndarray) -> np.ndarray:
        """RAS (..., 3) -> continuous (k, j, i) indices (..., 3) on the grid."""
        inv = self.grid.ras_to_ijk
        ijk = np.asarray(ras, float) @ inv[:3, :3].T + inv[:3, 3]
        return ijk[..., ::-1]

    def sample_combined(self, kji: np.ndarray) -> np.ndarray:
        """Trilinear reading of V (mm) at continuous (k, j, i) points."""
        c = (kji.reshape(-1, 3) - self.domain_lo).T
        return ndimage.map_coordinates(self.combined, c, order=1, mode="nearest",
                                       prefilter=False).reshape(kji.shape[:-1])

    def sample_group(self, gi: int, kji: np.ndarray) -> np.ndarray:
        """Trilinear reading of margin group ``gi``'s distance map (mm), capped at ``group_caps[gi]``."""
        lo, d = self.maps[gi]
        c = (kji.reshape(-1, 3) - lo).T
        return ndimage.map_coordinates(d, c, order=1, mode="constant", cval=self.group_caps[gi],
                                       prefilter=False).reshape(kji.shape[:-1])

    def _nearest_flat(self, kji: np.ndarray) -> np.ndarray:
        r = np.rint(kji).astype(np.intp)
        for ax in range(3):
            np.clip(r[..., ax], 0, self.shape[ax] - 1, out=r[..., ax])
        return (r[..., 0] * self.shape[1] + r[..., 1]) * self.shape[2] + r[..., 2]

    def inside_body(self, kji: np.ndarray) -> np.ndarray:
        """Body mask at the nearest voxel of continuous (k, j, i) points (outside the grid: edge value)."""
        return ndimage.map_coordinates(self.body, kji.reshape(-1, 3).T, order=0, mode="nearest",
                                       prefilter=False).reshape(kji.shape[:-1]).astype(bool)

    def group_at(self, kji: np.ndarray) -> np.ndarray:
        r = np.rint(kji.reshape(-1, 3) - self.domain_lo).astype(np.intp)
        for ax in range(3):
            np.clip(r[:, ax], 0, self.argmin.shape[ax] - 1, out=r[:, ax])
        return self.argmin[r[:, 0], r[:, 1], r[:, 2]].reshape(kji.shape[:-1])

    def _tree(self, name: str):
        """KD-tree (mm, k, j, i) of structure ``name``'s boundary voxel centres (built once, thread-safe)."""
        with self._lock:
            tree = self._trees.get(name)
            if tree is None:
                from scipy.spatial import cKDTree

                from TrajectoryPlannerLib.planning.risk import _erode6

                lo, hi = self.boxes[name]
                sub = self.masks[name][lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                boundary = sub & ~_erode6(sub, edge=False)  # nearest voxel seen from outside is a boundary voxel
                # an unbalanced tree builds faster and answers nearest-neighbour queries identically
                tree = cKDTree((_voxel_kji(boundary) + lo) * self.spacing_kji, balanced_tree=False,
                               compact_nodes=False)
                self._trees[name] = tree
            return tree

    def build_trees_async(self) -> threading.Thread:
        """Start building every structure's KD-tree in a background thread (numpy and the tree build release
        the GIL, so this overlaps with the distance maps or path evaluation); queries wait for their tree."""
        def run():
            for n in self.names:
                if self.boxes.get(n) is not None:
                    try:
                        self._tree(n)
                    except Exception:  # noqa: BLE001 - rebuilt (and raised) by the query that needs it
                        logger.debug("background KD-tree for %s failed", n, exc_info=True)
                        return
        th = threading.Thread(target=run, name="planner-kdtrees", daemon=True)
        th.start()
        return th

    def exact_distance(self, name: str, kji: np.ndarray) -> np.ndarray:
        """Exact distance (mm) from points to the nearest voxel centre of structure ``name``; 0 inside it."""
        self._tree(name)
        pts = kji.reshape(-1, 3)
        d = self._trees[name].query(pts * self.spacing_kji)[0]
        d[self.masks[name].ravel()[self._nearest_flat(pts)]] = 0.0
        return d.reshape(kji.shape[:-1])

    def surface_distance_min(self, name: str, kji: np.ndarray) -> float:
        """Exact smallest distance (mm) from the points (continuous k, j, i) to the voxel boxes of ``name``
        (to the voxel centres when ``to_surface`` is False); 0 when a point lies in a structure voxel."""
        pts = kji.reshape(-1, 3)
        dc = self.exact_distance(name, pts)
        m = float(dc.min())
        if not self.to_surface or m <= 0.0:
            return m
        h = self.half_diagonal_mm
        # a voxel box is at least (distance to its centre - h) away, so only these points can attain the minimum
        cand = pts[dc - h <= m] * self.spacing_kji
        tree = self._trees[name]
        n = tree.n
        k = min(16, n)
        while True:
            d, idx = tree.query(cand, k=k)
            d, idx = d.reshape(len(cand), -1), idx.reshape(len(cand), -1)
            bd = box_distance(cand, tree.data[idx], self.spacing_kji / 2.0).min(axis=1)
            # every box not among the k nearest centres is at least (k-th centre distance - h) away
            if k >= n or np.all(d[:, -1] - h >= bd):
                return float(bd.min())
            k = min(4 * k, n)

    def worst_structure(self, kji: np.ndarray) -> np.ndarray:
        """Index into ``names`` of the structure with the smallest distance - margin at points (N, 3).

        The margin group attaining V at the nearest voxel decides; within a group the nearest structure wins.
        """
        kji = kji.reshape(-1, 3)
        out = np.zeros(len(kji), np.int64)
        grp = self.group_at(kji)
        for gi in np.unique(grp):
            sel = grp == gi
            names = self.groups[gi][1]
            if len(names) == 1:
                out[sel] = self.names.index(names[0])
                continue
            d = np.stack([self.exact_distance(n, kji[sel]) for n in names], axis=-1)
            out[sel] = np.array([self.names.index(n) for n in names])[np.argmin(d, axis=-1)]
        return out

    def bound_mm(self, step_mm: float) -> float:
        """Conservative interpolation and sampling error bound (mm) subtracted from interpolated clearances
        (the surface offset comes on top, see :attr:`surface_offset_mm`)."""
        return self.half_diagonal_mm + step_mm / 2.0 + (0.0 if self.to_surface else self.pool_offset_mm)


# ------------------------------------------------------------------------------------------------
def _axial_normal(grid: RasVolume) -> np.ndarray:
    d = grid.direction_ras
    n = np.cross(d[:, 0], d[:, 1])
    return n / np.linalg.norm(n)


def _subsample(points: np.ndarray, spacing_mm: float) -> np.ndarray:
    """One point per occupied cube of ``spacing_mm`` (the first in array order)."""
    if len(points) == 0:
        return points
    keys = np.floor(points / spacing_mm).astype(np.int64)
    keys -= keys.min(axis=0)
    dims = keys.max(axis=0) + 1
    flat = (keys[:, 0] * dims[1] + keys[:, 1]) * dims[2] + keys[:, 2]
    _, first = np.unique(flat, return_index=True)
    return points[np.sort(first)]


def oblique_entries(risk: RiskModel, spacing_mm: float) -> np.ndarray:
    """Skin voxel centres (RAS mm) subsampled on a ``spacing_mm`` grid."""
    return _subsample(risk.grid.kji_to_ras_points(_voxel_kji(risk.skin)), spacing_mm)


def in_plane_entries(risk: RiskModel, target_ras, spacing_mm: float) -> np.ndarray:
    """Skin voxel centres within half a voxel of the target's axial plane, projected onto that plane."""
    n = _axial_normal(risk.grid)
    pts = risk.grid.kji_to_ras_points(_voxel_kji(risk.skin))
    half = 0.5 * abs(float(risk.grid.ijk_to_ras[:3, 2] @ n))
    off = (pts - np.asarray(target_ras, float)) @ n
    sel = pts[np.abs(off) <= half + 1e-6]
    sel = sel - np.outer((sel - np.asarray(target_ras, float)) @ n, n)
    return _subsample(sel, spacing_mm)


def evaluate_paths(maps: DistanceMaps, target_ras, entries: np.ndarray, needle: NeedleModel,
                   settings: PlanSettings, exclusion: EntryExclusion | None, reach_mm: float | None = None,
                   threads: int | None = None) -> CandidateEval:
    """Evaluate every straight path entry -> target (+ tip overshoot) against all constraints (vectorised)."""
    t = np.asarray(target_ras, float)
    entries = np.asarray(entries, float).reshape(-1, 3)
    reach = needle.max_reach_mm if reach_mm is None else reach_mm
    vec = t - entries
    length = np.linalg.norm(vec, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        direction = vec / length[:, None]
    n = _axial_normal(maps.grid)
    angle = np.degrees(np.arcsin(np.clip(np.abs(direction @ n), 0, 1)))
    names = ["needle_length", "angle_to_axial", "entry_region", "leaves_body"] + [f"clearance:{s}" for s in maps.names]
    reason = np.full(len(entries), -1, np.int32)
    reason[length > reach] = 0
    reason[length < 1e-6] = 0
    max_angle = settings.in_plane_tolerance_deg if settings.mode == "in-plane" else settings.max_angle_deg
    reason[(reason < 0) & (angle > max_angle + 1e-9)] = 1
    if exclusion is not None:
        reason[(reason < 0) & exclusion.excluded(t, entries)] = 2
    excess = np.full(len(entries), np.nan)
    todo = np.nonzero(reason < 0)[0]
    step = settings.sample_step_mm
    bound = maps.bound_mm(step)
    threshold = bound + maps.surface_offset_mm + needle.outer_radius_mm  # V must exceed this everywhere
    overshoot = needle.tip_overshoot_mm
    if len(todo):
        total = length[todo] + overshoot
        n_steps = np.ceil(total / step).astype(int)
        n_steps = ((n_steps + COARSE_EVERY - 1) // COARSE_EVERY) * COARSE_EVERY  # coarse samples on fine ones
        e_kji = maps.ras_to_kji(entries[todo])
        tip_kji = maps.ras_to_kji(t + direction[todo] * overshoot)
        skip_frac = settings.skin_skip_mm / total
        coarse_step = COARSE_EVERY * step
        # A fine pass cannot change a path whose coarse minimum already proves (V is 1-Lipschitz, trilinear
        # error <= h) an excess above clearance_ref: it is valid and its clearance term is saturated.
        h = maps.half_diagonal_mm
        saturate = threshold + settings.clearance_ref_mm + 2 * h + coarse_step / 2.0

        def run_chunk(g):
            idx = todo[g]
            frac = np.linspace(0.0, 1.0, n_steps[g[0]] + 1)  # fine samples, <= step apart
            fc = frac[::COARSE_EVERY]  # coarse pass: every COARSE_EVERY-th fine sample (includes both ends)
            pts = e_kji[g, None, :] + fc[None, :, None] * (tip_kji[g] - e_kji[g])[:, None, :]
            vals = maps.sample_combined(pts)
            am = vals.argmin(axis=1)
            mins = vals[np.arange(len(g)), am]
            worst = pts[np.arange(len(g)), am]
            bad = mins < threshold
            good = ~bad
            out_body = np.zeros(len(g), bool)
            # body check at every fine sample (nearest voxel) for paths the coarse pass kept
            if good.any():
                gg = g[good]
                ptsf = e_kji[gg, None, :] + frac[None, :, None] * (tip_kji[gg] - e_kji[gg])[:, None, :]
                insf = maps.inside_body(ptsf) | (frac[None, :] < skip_frac[gg, None])
                out_body[good] = ~insf.all(axis=1)
                fine = np.nonzero(good)[0]
                fine = fine[~out_body[fine] & (mins[fine] < saturate)]
                if len(fine):
                    sel = np.isin(np.nonzero(good)[0], fine)
                    vf = maps.sample_combined(ptsf[sel])
                    amf = vf.argmin(axis=1)
                    mins[fine] = vf[np.arange(len(fine)), amf]
                    worst[fine] = ptsf[sel][np.arange(len(fine)), amf]
                sat = good & ~out_body & (mins >= saturate)
                mins[sat] -= 2 * h + coarse_step / 2.0  # proven lower bound of the fine minimum
            excess[idx] = mins - threshold
            r = np.full(len(g), -1, np.int32)
            r[out_body] = 3
            viol = (~out_body) & (mins < threshold)
            if viol.any():
                r[viol] = 4 + maps.worst_structure(worst[viol]).astype(np.int32)
            reason[idx] = r

        chunks = []
        for ns in np.unique(n_steps):
            grp = np.nonzero(n_steps == ns)[0]
            size = max(1, 400_000 // (ns + 1))
            chunks += [grp[c0:c0 + size] for c0 in range(0, len(grp), size)]
        workers = max(1, int(threads or settings.threads or os.cpu_count() or 1))
        if workers > 1 and len(chunks) > 1:
            with ThreadPoolExecutor(workers) as ex:
                list(ex.map(run_chunk, chunks))  # scipy releases the GIL in map_coordinates
        else:
            for c in chunks:
                run_chunk(c)
    wsum = settings.weight_length + settings.weight_clearance + settings.weight_obliquity
    score = (settings.weight_length * np.clip(1 - length / max(reach, 1e-6), 0, 1)
             + settings.weight_clearance * np.clip(np.nan_to_num(excess, nan=0.0) / settings.clearance_ref_mm, 0, 1)
             + settings.weight_obliquity * (1 - angle / 90.0)) / wsum
    score = np.where(reason < 0, score, np.nan)
    return CandidateEval(entries, length, angle, reason, names, excess, score, int(len(todo)))


def _funnel_message(target: str, ev: CandidateEval, needle: NeedleModel, settings: PlanSettings) -> str:
    if not len(ev.entries):
        where = "on the target's axial slice" if settings.mode == "in-plane" else "on the CT"
        return (f"no safe path to target {target}: no skin was found {where} to enter from; check that the CT "
                "shows the whole body outline around the target (a field of view cut inside the body has no skin) "
                "and is in Hounsfield units")
    f = ev.funnel()
    parts = []
    for k, c in f.items():
        if k == "needle_length":
            parts.append(f"{c} beyond the needle's {needle.max_reach_mm:.0f} mm reach")
        elif k == "angle_to_axial":
            lim = settings.in_plane_tolerance_deg if settings.mode == "in-plane" else settings.max_angle_deg
            parts.append(f"{c} steeper than {lim:g} deg to the axial plane")
        elif k == "entry_region":
            parts.append(f"{c} in the excluded entry region")
        elif k == "leaves_body":
            parts.append(f"{c} leave the body on the way")
        else:
            parts.append(f"{c} too close to {k.split(':', 1)[1]}")
    return (f"no safe path to target {target}: of {len(ev.entries)} skin entries, " + ", ".join(parts)
            + "; relax a margin, allow steeper angles or choose another needle or target")


def _rank(ev: CandidateEval, top_n: int, separation_mm: float) -> list[int]:
    ok = np.nonzero(ev.valid)[0]
    order = ok[np.argsort(-ev.score[ok], kind="stable")]
    chosen: list[int] = []
    for i in order:
        if all(np.linalg.norm(ev.entries[i] - ev.entries[j]) >= separation_mm for j in chosen):
            chosen.append(int(i))
            if len(chosen) >= top_n:
                break
    return chosen


def _make_trajectory(maps: DistanceMaps, target: Target, entry, ev: CandidateEval, i: int,
                     needle: NeedleModel, settings: PlanSettings, rank: int, name: str) -> Trajectory:
    t = np.asarray(target.point_ras, float)
    e = np.asarray(entry, float)
    L = float(np.linalg.norm(t - e))
    d = (t - e) / L
    tip = t + d * needle.tip_overshoot_mm
    ns = max(1, int(math.ceil((L + needle.tip_overshoot_mm) / settings.sample_step_mm)))
    pts = maps.ras_to_kji(e[None, :] + np.linspace(0, 1, ns + 1)[:, None] * (tip - e)[None, :])
    # exact distances to the voxel surfaces at the samples; between samples the distance dips by <= step / 2
    sub = settings.sample_step_mm / 2.0 + needle.outer_radius_mm + (0.0 if maps.to_surface else maps.pool_offset_mm)
    clearance = {s: maps.surface_distance_min(s, pts) - sub for s in maps.names}
    return Trajectory(name, target.name, target.region, e, t, needle.name, L, clearance, dict(maps.margins),
                      float(ev.angle_deg[i]), float(ev.score[i]), rank, tip)


def _key(points: np.ndarray) -> list[tuple]:
    return [tuple(v) for v in np.round(points, 2)]


# ------------------------------------------------------------------------------------------------
def _parse_targets(targets) -> list[Target]:
    out = []
    for t in targets or []:
        if isinstance(t, Target):
            out.append(t)
            continue
        try:
            p = [float(v) for v in t["point_ras"]]
        except (KeyError, TypeError, ValueError):
            raise TrajectoryPlannerError(f"target {t!r} has no valid 'point_ras' [x, y, z] in mm") from None
        if len(p) != 3 or not all(math.isfinite(v) for v in p):
            raise TrajectoryPlannerError(f"target '{t.get('name', '?')}' needs three finite RAS coordinates in mm")
        out.append(Target(str(t.get("name", f"T{len(out) + 1}")), tuple(p), str(t.get("region", ""))))
    if not out:
        raise TrajectoryPlannerError("no targets given; add at least one target point (RAS, mm)")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise TrajectoryPlannerError(f"target names must be unique, got {names}")
    return out


def plan(ct: RasVolume, targets, needle: str | NeedleModel = DEFAULT_NEEDLE,
         labelmaps: list[tuple[RasVolume, dict | None]] | None = None, margins: dict | None = None,
         settings: PlanSettings | None = None, exclusion: EntryExclusion | None | str = "supine",
         auto_structures: bool = True, progress=None, should_cancel=None, body_hu: float = BODY_HU_THRESHOLD) -> PlanResult:
    """Plan ranked safe trajectories for each target (CT in HU; targets RAS mm; see module docstring).

    ``labelmaps``: list of (label volume, {value: name}) user structures; ``margins``: name -> mm overrides.
    ``exclusion``: an :class:`EntryExclusion`, a patient position ('supine', 'prone', 'none') or None.
    Raises :class:`NoSafePathError` when a target has no safe path (unless ``settings.allow_partial``).
    """
    settings = settings or PlanSettings()
    needle = get_needle(needle) if not isinstance(needle, NeedleModel) else needle
    if isinstance(exclusion, str):
        exclusion = EntryExclusion.for_patient_position(exclusion)
    tg = _parse_targets(targets)
    timings: dict[str, float] = {}
    progress = progress or (lambda f, m: None)

    def check_cancel():
        if should_cancel is not None and should_cancel():
            raise TrajectoryPlannerError("planning was cancelled")

    t0 = time.perf_counter()
    shape = np.array(ct.array.shape)
    pts_kji = np.array([ct.ras_to_ijk_points(np.asarray(t.point_ras))[0][::-1] for t in tg])
    for t, p in zip(tg, pts_kji):
        if np.any(p < -0.5) or np.any(p > shape - 0.5):
            raise TrajectoryPlannerError(
                f"target {t.name} at RAS {tuple(round(v, 1) for v in t.point_ras)} lies outside the CT; "
                "check the target coordinates (RAS, mm) and that the CT covers the tumour")
    pad_mm = needle.max_reach_mm + settings.distance_cap_mm
    pad = np.ceil(pad_mm / ct.spacing[::-1]).astype(int)
    lo = np.maximum(np.floor(pts_kji.min(axis=0)).astype(int) - pad, 0)
    hi = np.minimum(np.ceil(pts_kji.max(axis=0)).astype(int) + pad + 1, shape)
    blo, bhi = _rough_body_box(ct, body_hu)
    lo, hi = np.maximum(lo, blo), np.minimum(hi, bhi)
    grid = crop_volume(ct, lo, hi)
    timings["crop"] = time.perf_counter() - t0
    progress(0.05, "risk structures")

    t0 = time.perf_counter()
    lms = []
    for lm, names in labelmaps or []:  # crop label maps that share the CT grid; others are resampled
        lms.append((crop_volume(lm, lo, hi) if lm.same_grid(ct) else lm, names))
    factors = _pool_factors(grid.spacing, settings.planning_spacing_mm)
    pool_offset = 0.0
    pre_entries = None
    if factors is not None:
        grid, risk, pool_offset = _pooled_risk_model(grid, factors, lms, margins, exclusion, auto_structures,
                                                     body_hu, settings.threads)
    else:
        # body and skin first: the candidate entries give the box the paths can run in, and the structures
        # are only built there, grown by the distance cap (farther structure voxels cannot change a reading)
        from TrajectoryPlannerLib.planning import risk as risk_mod

        risk_mod.check_hounsfield(grid)
        body = risk_mod.body_mask(grid, body_hu, threads=settings.threads)
        pre = RiskModel(grid, body, risk_mod.skin_mask(body), [], exclusion)
        pre_entries = _entry_sets(pre, tg, settings)  # the skin (so the entries) does not depend on structures
        region = _structure_region(grid, tg, pre, needle, settings, exclusion, margins, pre_entries[1])
        risk = build_risk_model(grid, lms, margins, exclusion, auto=auto_structures, body_hu=body_hu,
                                threads=settings.threads, region=region, body=body, skin=pre.skin)
    timings["risk_structures"] = time.perf_counter() - t0
    check_cancel()

    # target sanity: inside the body and not inside a structure
    for t in tg:
        k = np.rint(grid.ras_to_ijk_points(np.asarray(t.point_ras))[0][::-1]).astype(int)
        k = np.clip(k, 0, np.array(grid.array.shape) - 1)
        if not risk.body[tuple(k)]:
            raise TrajectoryPlannerError(
                f"target {t.name} at RAS {tuple(round(v, 1) for v in t.point_ras)} lies outside the body; "
                "check the target coordinates (RAS, mm)")
        for s in risk.structures:
            if s.mask[tuple(k)]:
                raise TrajectoryPlannerError(
                    f"target {t.name} lies inside {s.name}; move the target into the tumour or correct the "
                    f"{s.name} segmentation")

    progress(0.2, "distance maps")
    t0 = time.perf_counter()
    common, entry_sets = pre_entries if pre_entries is not None else _entry_sets(risk, tg, settings)
    domain = _path_domain(grid, tg, entry_sets, needle, settings, exclusion)
    screen = None
    if settings.screening == "pooled":
        from TrajectoryPlannerLib.planning import screening as screen

        maps = screen.PooledScreen(risk, settings.distance_cap_mm, settings.threads, domain,
                                   to_surface=CLEARANCE_TO_SURFACE)
    else:
        maps = DistanceMaps(risk, settings.distance_cap_mm, settings.threads, pool_offset, domain,
                            to_surface=CLEARANCE_TO_SURFACE, prebuild_trees=True)
    timings["distance_maps"] = time.perf_counter() - t0
    check_cancel()

    t0 = time.perf_counter()
    bound = maps.bound_mm(settings.sample_step_mm)
    evals: dict[str, CandidateEval] = {}
    failures: dict[str, str] = {}
    trajectories: list[Trajectory] = []
    best: dict[str, Trajectory] = {}
    shortest: dict[str, float] = {}
    n_paths = 0
    for ti, t in enumerate(tg):
        progress(0.3 + 0.6 * ti / len(tg), f"evaluating paths to {t.name}")
        check_cancel()
        entries = entry_sets[t.name]
        if screen is None:
            ev = evaluate_paths(maps, t.point_ras, entries, needle, settings, exclusion)
            ranked = _rank(ev, settings.top_n, settings.min_entry_separation_mm)
        else:  # lazy exact re-scoring of what can reach the ranked list
            ev = screen.screen_paths(maps, t.point_ras, entries, needle, settings, exclusion)
            ranked = ev.rank(settings.top_n, settings.min_entry_separation_mm)
        n_paths += ev.paths_evaluated
        evals[t.name] = ev
        if not ev.valid.any():
            msg = _funnel_message(t.name, ev, needle, settings)
            needed = None
            if (ev.reason == 0).any() and settings.extra_reach_mm > 0:  # would a longer needle help?
                needed = _shortest_safe_length(ct, t, needle, labelmaps, margins, settings, exclusion,
                                               auto_structures, body_hu)
                if needed is not None:
                    msg = (f"needle {needle.name} is too short for target {t.name}: it reaches "
                           f"{needle.max_reach_mm:.0f} mm but the shortest safe path is {needed:.0f} mm; choose a "
                           f"needle with at least {math.ceil(needed)} mm reach")
            if not settings.allow_partial:
                raise NoSafePathError(msg, ev.funnel(), needed)
            failures[t.name] = msg
            logger.warning(msg)
            continue
        shortest[t.name] = float(ev.length_mm[ev.valid].min()) if screen is None else ev.shortest_valid_length()
        for r, i in enumerate(ranked, start=1):
            tr = _make_trajectory(maps, t, ev.entries[i], ev, i, needle, settings, r, f"{t.name}-{r}")
            trajectories.append(tr)
            if r == 1:
                best[t.name] = tr
    timings["path_evaluation"] = time.perf_counter() - t0

    # shared entry -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    shared, note = None, ""
    if settings.shared_entry and len(tg) > 1 and not failures:
        shared, note = (_shared_entry if screen is None else screen.shared_entry)(maps, tg, evals, best, needle,
                                                                                 settings)
    elif settings.shared_entry and len(tg) > 1:
        note = "no shared entry: at least one target has no safe path"
    timings["shared_entry"] = time.perf_counter() - t0

    # skin accessibility data
    if common is not None:
        skin_pts = common
        stack = np.stack([np.where(evals[t.name].valid, evals[t.name].min_excess_mm, -np.inf)
                          for t in tg if t.name in evals])
    else:
        skin_pts = np.concatenate([evals[t.name].entries for t in tg if t.name in evals])
        parts = []
        for t in tg:
            if t.name not in evals:
                continue
            v = np.full(len(skin_pts), -np.inf)
            ev = evals[t.name]
            off = sum(len(evals[u.name].entries) for u in tg[:tg.index(t)] if u.name in evals)
            v[off:off + len(ev.entries)] = np.where(ev.valid, ev.min_excess_mm, -np.inf)
            parts.append(v)
        stack = np.stack(parts)
    reachable = np.isfinite(stack).sum(axis=0)
    # convert margin excess back to raw clearance to the structure that limited it is not possible here;
    # the skin map shows the best margin excess (mm above the margin), 0 where no target is accessible.
    best_excess = np.where(reachable > 0, np.max(stack, axis=0), 0.0)
    progress(1.0, "plan ready")
    logger.info("planned %d trajectories for %d targets (%d paths evaluated, bound %.2f mm)",
                len(trajectories), len(tg), n_paths, bound)
    return PlanResult(tg, trajectories, shared, {k: v.funnel() for k, v in evals.items()},
                      {k: int(len(v.entries)) for k, v in evals.items()}, failures, needle, settings, bound,
                      risk.to_dict(), timings, skin_pts, np.clip(best_excess, 0, None), reachable, note, shortest,
                      grid.with_array(np.asarray(risk.body, bool).view(np.uint8), name="body"), maps.surface_offset_mm,
                      {k: v.unresolved for k, v in evals.items()} if screen is not None else {})


def _path_domain(grid, targets, entry_sets, needle, settings, exclusion):
    """(lo, hi) k, j, i box holding every path that passes the cheap constraints (length, angle, entry region),
    including the fired tip; None when nothing passes (the maps are then built on the whole grid)."""
    pts = []
    reach = needle.max_reach_mm
    n = _axial_normal(grid)
    max_angle = settings.in_plane_tolerance_deg if settings.mode == "in-plane" else settings.max_angle_deg
    for t in targets:
        tp = np.asarray(t.point_ras, float)
        e = entry_sets[t.name]
        if len(e) == 0:
            continue
        v = tp - e
        L = np.linalg.norm(v, axis=1)
        ok = (L <= reach) & (L > 1e-6)
        with np.errstate(invalid="ignore", divide="ignore"):
            ang = np.degrees(np.arcsin(np.clip(np.abs((v / L[:, None]) @ n), 0, 1)))
        ok &= ang <= max_angle + 1e-9
        if exclusion is not None:
            ok &= ~exclusion.excluded(tp, e)
        if ok.any():
            pts.append(e[ok])
            pts.append(tp[None] + needle.tip_overshoot_mm * np.array([[s1, s2, s3] for s1 in (-1, 1)
                                                                      for s2 in (-1, 1) for s3 in (-1, 1)]))
    if not pts:
        return None
    kji = grid.ras_to_ijk_points(np.concatenate(pts))[:, ::-1]
    lo = np.maximum(np.floor(kji.min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(kji.max(axis=0)).astype(int) + 2, grid.array.shape)
    return lo, hi


def _entry_sets(risk: RiskModel, targets, settings) -> tuple[np.ndarray | None, dict]:
    """(common oblique entries or None, {target: candidate entries RAS mm}) from the model's skin."""
    common = oblique_entries(risk, settings.entry_spacing_mm) if settings.mode == "oblique" else None
    return common, {t.name: common if common is not None else
                    in_plane_entries(risk, t.point_ras, settings.entry_spacing_mm / 2.0) for t in targets}


def _structure_region(grid, targets, pre: RiskModel, needle, settings, exclusion, margins, entry_sets=None):
    """(lo, hi) k, j, i box where risk structures can affect a path: the path domain grown by the largest
    distance cap :class:`DistanceMaps` can use (+ 2 voxels); None (everywhere) when no path passes.
    ``entry_sets``: the candidate entries per target when already computed from ``pre``'s skin."""
    from TrajectoryPlannerLib.planning.risk import DEFAULT_MARGINS_MM, GENERIC_MARGIN_MM

    if entry_sets is None:
        entry_sets = _entry_sets(pre, targets, settings)[1]
    domain = _path_domain(grid, targets, entry_sets, needle, settings, exclusion)
    if domain is None:
        return None
    max_margin = max([GENERIC_MARGIN_MM, *DEFAULT_MARGINS_MM.values(), *[float(v) for v in (margins or {}).values()]])
    cap = max(settings.distance_cap_mm, max_margin + 10.0)
    pad = np.ceil(cap / grid.spacing[::-1]).astype(int) + 3
    return np.maximum(domain[0] - pad, 0), np.minimum(domain[1] + pad, grid.array.shape)


def _pool_factors(spacing_ijk, planning_spacing_mm):
    """Integer block size per (k, j, i) axis bringing the spacing up to about ``planning_spacing_mm``."""
    if not planning_spacing_mm:
        return None
    f = np.maximum(1, np.floor(planning_spacing_mm / np.asarray(spacing_ijk, float)[::-1] + 1e-6)).astype(int)
    return None if np.all(f == 1) else f


def _block(a: np.ndarray, f, reduce):
    """Reduce ``a`` (k, j, i) over blocks of size ``f`` with ``reduce`` (np.max or np.min), edge blocks padded
    with edge values; element-wise over the strided sub-grids (no 6-D reshape, no large temporaries)."""
    pad = [(0, (-n) % b) for n, b in zip(a.shape, f)]
    if any(p[1] for p in pad):
        a = np.pad(a, pad, mode="edge")
    op = np.maximum if reduce is np.max else np.minimum
    out = None
    for dk in range(f[0]):
        for dj in range(f[1]):
            for di in range(f[2]):
                v = a[dk::f[0], dj::f[1], di::f[2]]
                out = v.copy() if out is None else op(out, v, out=out)
    return out


def _pooled_risk_model(grid, f, labelmaps, margins, exclusion, auto, body_hu, threads):
    """Risk model on a grid coarser by ``f`` with conservatively max-pooled structures.

    Body and bone use the block maximum of HU, gas the block minimum (inside the eroded body), user label
    maps "any voxel of the block". Returns (coarse grid, risk model, pool offset mm): every fine structure
    voxel centre lies within the offset of its pooled voxel centre, so distances shrink by at most that.
    """
    from TrajectoryPlannerLib.planning.risk import (RiskStructure, _erode6, _keep_components, body_mask, default_margin, skin_mask,
                       structures_from_labelmap)

    a = np.asarray(grid.array)
    m = grid.ijk_to_ras.copy()
    m[:3, :3] = grid.ijk_to_ras[:3, :3] @ np.diag(f[::-1].astype(float))
    # the pooled voxel centre is the centre of its block of fine voxels
    m[:3, 3] = grid.ijk_to_ras_points((f[::-1] - 1) / 2.0)[0]
    hi_ct = RasVolume(_block(a, f, np.max), m, grid.name, dict(grid.meta))
    lo_hu = _block(a, f, np.min)
    spacing = hi_ct.spacing
    body = body_mask(hi_ct, body_hu, threads=threads)
    skin = skin_mask(body)
    margins_l = {k.lower(): float(v) for k, v in (margins or {}).items()}
    structures = []
    if auto:
        bone = _keep_components((hi_ct.array > 200.0) & body, spacing, 50.0, threads=threads)
        gas = _keep_components((lo_hu < -400.0) & _erode6(body, edge=True), spacing, 50.0, threads=threads)
        for name, mask in (("bone", bone), ("gas", gas)):
            if mask.any():
                structures.append(RiskStructure(name, mask, margins_l.get(name, default_margin(name)), "ct"))
    user = []
    for lm, names in labelmaps:
        fine = lm if lm.same_grid(grid) else None
        if fine is None:  # other grid: resample onto the fine grid first
            user += [RiskStructure(s.name, _block(s.mask, f, np.max), s.margin_mm, s.source)
                     for s in structures_from_labelmap(lm, grid, names, margins)]
            continue
        arr = np.asarray(fine.array)
        values = sorted(names) if names else [int(v) for v in np.unique(arr) if v != 0]
        pad = [(0, (-n) % b) for n, b in zip(arr.shape, f)]
        if any(p[1] for p in pad):
            arr = np.pad(arr, pad, mode="edge")
        views = [arr[dk::f[0], dj::f[1], di::f[2]] for dk in range(f[0]) for dj in range(f[1]) for di in range(f[2])]
        for v in values:
            name = names[v] if names else f"label_{v}"
            mask = views[0] == v
            for w in views[1:]:
                mask |= w == v
            if mask.any():
                user.append(RiskStructure(name, mask, margins_l.get(name.lower(), default_margin(name)), "user"))
    user_names = {s.name for s in user}
    structures = [s for s in structures if s.name not in user_names] + user
    offset = 0.5 * float(np.linalg.norm((f[::-1] - 1) * grid.spacing))
    logger.info("planning grid pooled by %s (k, j, i): offset %.2f mm added to the clearance bound", f.tolist(), offset)
    return hi_ct, RiskModel(hi_ct, body, skin, structures, exclusion), offset


def _rough_body_box(ct: RasVolume, body_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) k, j, i index box around everything above ``body_hu`` (read every 4th voxel), 8 voxels wider."""
    a = np.asarray(ct.array)
    sub = a[::2, ::4, ::4] > body_hu
    if not sub.any():
        raise TrajectoryPlannerError(f"no body found in the CT (nothing above {body_hu:.0f} HU); check that the CT is in HU")
    step = np.array([2, 4, 4])
    lo = np.array([np.nonzero(sub.any(axis=ax))[0][0] for ax in ((1, 2), (0, 2), (0, 1))]) * step - step - 8
    hi = np.array([np.nonzero(sub.any(axis=ax))[0][-1] for ax in ((1, 2), (0, 2), (0, 1))]) * step + step + 9
    return np.maximum(lo, 0), np.minimum(hi, a.shape)


def _shortest_safe_length(ct, target, needle, labelmaps, margins, settings, exclusion, auto,
                          body_hu) -> float | None:
    """Shortest safe skin-to-target length (mm) with a needle ``extra_reach_mm`` longer, or None."""
    import dataclasses

    extra = settings.extra_reach_mm
    core = dataclasses.replace(needle.core, usable_length_mm=needle.core.usable_length_mm + extra)
    intro = None if needle.introducer is None else dataclasses.replace(
        needle.introducer, usable_length_mm=needle.introducer.usable_length_mm + extra)
    longer = dataclasses.replace(needle, name=needle.name + " (longer)", core=core, introducer=intro)
    s2 = dataclasses.replace(settings, extra_reach_mm=0.0, allow_partial=True, shared_entry=False, top_n=1)
    r = plan(ct, [target], longer, labelmaps, margins, s2, exclusion, auto, body_hu=body_hu)
    return r.shortest_safe_length_mm.get(target.name)


def _shared_entry(maps, tg, evals, best, needle, settings):
    keys = None
    index: dict[str, dict] = {}
    for t in tg:
        ev = evals[t.name]
        ok = np.nonzero(ev.valid)[0]
        d = dict(zip(_key(ev.entries[ok]), ok))
        index[t.name] = d
        keys = set(d) if keys is None else keys & set(d)
    if not keys:
        return None, "no single skin entry gives a safe path to every target under the current constraints"
    keys = sorted(keys)
    scores = np.array([[evals[t.name].score[index[t.name][k]] for t in tg] for k in keys])
    j = int(np.argmax(scores.mean(axis=1)))
    k = keys[j]
    trs = []
    tradeoff = {}
    for t in tg:
        i = index[t.name][k]
        tr = _make_trajectory(maps, t, evals[t.name].entries[i], evals[t.name], i, needle, settings, 1,
                              f"{t.name}-shared")
        trs.append(tr)
        b = best[t.name]
        tradeoff[t.name] = {"score_loss": round(b.score - tr.score, 4),
                            "length_increase_mm": round(tr.length_mm - b.length_mm, 2),
                            "min_margin_excess_loss_mm": round(b.min_margin_excess_mm - tr.min_margin_excess_mm, 2)}
    dirs = [(tr.target_ras - tr.entry_ras) / tr.length_mm for tr in trs]
    fan = max(math.degrees(math.acos(np.clip(a @ b, -1, 1))) for a in dirs for b in dirs)
    return SharedEntryPlan(np.asarray(trs[0].entry_ras), trs, tradeoff, fan), \
        f"{len(keys)} skin entries reach all targets safely"

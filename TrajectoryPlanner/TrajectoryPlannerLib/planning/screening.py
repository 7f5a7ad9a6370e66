"""Pooled screening with exact re-scoring (``PlanSettings.screening = "pooled"``): the same ranked paths and
scores as the exact planner (:func:`.engine.evaluate_paths` on full-resolution distance maps) without
full-resolution distance maps.

Bound. The structure masks are max-pooled by 2 along every axis (a pooled voxel is structure when any of its
2 x 2 x 2 fine voxels is) and exact capped distance maps are computed on the pooled grid (8 x fewer voxels).
Every fine structure voxel centre lies within the pool offset ``o`` (= half the fine voxel diagonal) of its
pooled voxel centre and every pooled structure voxel contains a fine one, so the distances to the two centre
sets differ by at most ``o``; trilinear reading of the pooled map differs from its continuous distance by at
most the pooled half diagonal ``H`` and the exact planner's trilinear reading from the fine distance by at most
the fine half diagonal ``h`` (distances are 1-Lipschitz). With the pooled maps capped ``B`` higher than the
fine ones, the exact planner's reading ``E`` of the combined margin field at any point and the pooled reading
``P`` satisfy ``min(P, Vcap) - B <= E <= min(P + B, Vcap)``, ``B = o + H + h`` (+ 1e-3 mm for float32),
``Vcap`` the exact field's cap. Between the coarse samples (every 8th) the fine samples dip by at most
``2h + coarse step / 2`` (as in the exact planner).

Screening. Every candidate path is read on the pooled field exactly like the exact planner reads the fine one
(coarse pass, body check on the fine body mask at every fine sample, fine pass), giving per path a lower and an
upper bound of the exact planner's minimum reading. A path whose upper bound is below the acceptance threshold
is rejected (the exact planner rejects it too); a path whose lower bound clears threshold + ``clearance_ref_mm``
has the exact planner's score (its clearance term is saturated); the others have a score interval.

Exact re-scoring. The exact reading of a path is recomputed without the full-resolution maps: only at the fine
samples whose lower bound is at most the path's upper bound (no other sample can hold the minimum), from the
exact capped distances of the 8 surrounding voxel centres (KD-trees of the structures' boundary voxels, the same
trees as the exact clearances), combined as the exact planner combines its maps (float32) and interpolated by the
same trilinear routine: the value equals the exact planner's reading.

Ranking (lazy greedy). Per target a heap holds every path that may be valid, keyed by its exact score when
known and by its optimistic (upper) score otherwise; an open top is first probed (the exact reading at its most
promising sample: a tighter upper bound, or a proven rejection) and put back, a probed open top is re-scored
in full (both in batches of ``BATCH``), and an exact top is
the next path of the exact planner's order (score descending, index ascending), so the entry-separation rule
picks the same paths. The shortest safe length takes paths in length order and re-scores until one is valid;
the shared entry keys entries by the optimistic mean score over the targets in the same way (ties: the exact
planner's first entry).

What changes meaning (stated in plan.json under ``screening``): the rejection funnel counts from the screening
bounds: a path is rejected for clearance when its upper bound fails or its re-scoring fails, ``leaves_body``
is checked for every path the pooled coarse pass keeps (the exact planner checks the body only for paths its own
coarse pass keeps); paths whose validity was never needed (near a margin, neither proven safe nor rejected)
are not in the funnel but counted per target in plan.json (``screening.unresolved_near_margin``).
The skin map's margin excess is the exact re-scored excess where known, else the screening lower bound; an
entry counts as reaching a target only when proven safe.
"""
from __future__ import annotations

import heapq
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from SmartBiopsyCoreLib.geometry import RasVolume

from TrajectoryPlannerLib.planning import engine as eng
from TrajectoryPlannerLib.planning.risk import RiskModel, RiskStructure

logger = logging.getLogger(__name__)

POOL = 2  # block size along every axis
FLOAT_SLACK_MM = 1e-3  # float32 rounding of the maps, added to the bound
BATCH = 64  # paths re-scored together (vectorised); extra ones cost little
#: decide every open path's validity exactly: the funnel totals and the skin map's reachable targets are then the
#: exact planner's, but it costs about as much CPU as the full-resolution maps saved (bench_planner --screening)
RESOLVE_VALIDITY = False

#: Written into plan.json when the pooled screening is used.
SCREENING_NOTE = (
    "pooled screening (structure masks max-pooled by 2, bound = pool offset + pooled half diagonal + fine half "
    "diagonal) with exact re-scoring of every path that can reach the ranked list: trajectories, scores, shared "
    "entry and shortest safe length equal the exact planner's. The rejection funnel counts from the screening "
    "bounds (leaves_body is checked for every path the pooled coarse pass keeps; paths never re-scored because "
    "their validity did not matter are not in the funnel, their number per target is unresolved_near_margin); "
    "the skin map's excess is the exact "
    "excess where re-scored, else the screening lower bound, and an entry counts as reaching a target only when "
    "proven safe.")

UNKNOWN, VALID, KNOWN, INVALID = 0, 1, 2, -1  # validity unknown / valid, score unknown / valid, score exact / invalid


class PooledScreen:
    """Pooled distance maps for screening plus the exact per-structure distances for re-scoring.

    ``fine``: a :class:`.engine.DistanceMaps` without maps (exact distances, body, clearances of the returned
    trajectories); ``pooled``: one with capped exact maps on the 2x pooled grid. Attribute access falls
    through to ``fine``, so the engine's trajectory code uses it as its maps.
    """

    def __init__(self, risk: RiskModel, cap_mm: float, threads: int | None, domain: tuple | None,
                 to_surface: bool = True):
        self.fine = eng.DistanceMaps(risk, cap_mm, threads, 0.0, domain, to_surface=to_surface, build_maps=False)
        f = self.fine
        grid = risk.grid
        shape = np.array(grid.array.shape)
        pshape = tuple(int(v) for v in -(-shape // POOL))
        m = grid.ijk_to_ras.copy()
        m[:3, :3] = grid.ijk_to_ras[:3, :3] * POOL
        m[:3, 3] = grid.ijk_to_ras_points(np.full((1, 3), (POOL - 1) / 2.0))[0]  # pooled centre = block centre
        pgrid = RasVolume(np.broadcast_to(np.uint8(0), pshape), m, grid.name + " (pooled)")
        structures = []
        for s in risk.structures:
            pm = np.zeros(pshape, bool)
            box = f.boxes[s.name]
            if box is not None:
                lo = (box[0] // POOL) * POOL
                sub = eng._block(s.mask[lo[0]:box[1][0], lo[1]:box[1][1], lo[2]:box[1][2]], (POOL,) * 3, np.max)
                plo = lo // POOL
                pm[plo[0]:plo[0] + sub.shape[0], plo[1]:plo[1] + sub.shape[1], plo[2]:plo[2] + sub.shape[2]] = sub
            structures.append(RiskStructure(s.name, pm, s.margin_mm, s.source))
        h = f.half_diagonal_mm
        self.pool_offset = 0.5 * float(np.linalg.norm((POOL - 1) * f.spacing_kji))
        self.pooled_half_diagonal = 0.5 * float(np.linalg.norm(POOL * f.spacing_kji))
        self.B = self.pool_offset + self.pooled_half_diagonal + h + FLOAT_SLACK_MM
        self.vcap = np.float32(f.cap - (max(f.margins.values()) if f.margins else 0.0))
        pdomain = None
        if domain is not None:
            dlo, dhi = np.asarray(domain[0]), np.asarray(domain[1])
            pdomain = (np.floor((dlo - 0.5) / POOL).astype(int) - 1, np.ceil((dhi - 1.5) / POOL).astype(int) + 2)
        prisk = RiskModel(pgrid, np.zeros(pshape, bool), np.zeros(pshape, bool), structures, risk.exclusion)
        self.pooled = eng.DistanceMaps(prisk, f.cap + self.B, threads, 0.0, pdomain, to_surface=False)
        self.threads = threads
        # the exact planner's combined field, filled lazily at the voxels re-scoring reads (zero pages cost nothing)
        dshape = tuple(int(v) for v in (np.array(shape) if domain is None else
                                        np.minimum(np.asarray(domain[1], int), shape) - f.domain_lo))
        self.field = np.zeros(dshape, np.float32)
        self.filled = np.zeros(dshape, bool)
        self.corners_computed = 0

    def __getattr__(self, name):  # the engine's trajectory code reads the fine maps' attributes
        return getattr(self.__dict__["fine"], name)

    # readings ----------------------------------------------------------------------------------
    def pooled_bounds(self, kji: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) bound (mm) of the exact planner's combined-field reading at fine (k, j, i) points."""
        p = self.pooled.sample_combined((kji - (POOL - 1) / 2.0) / POOL).astype(np.float64)
        lo = np.minimum(p, self.vcap) - self.B
        hi = np.minimum(p + self.B, self.vcap)
        return lo, hi

    def _structure_distance(self, name: str, kji: np.ndarray, cap: float) -> np.ndarray:
        """Exact distance (mm) from fine voxel centres (integer k, j, i) to the voxel centres of ``name``, 0
        inside it, inf beyond ``cap`` (the same KD-tree as the exact clearances)."""
        f = self.fine
        if name not in f._trees:
            f.exact_distance(name, kji[:1].astype(float))  # builds the tree
        d = f._trees[name].query(kji * f.spacing_kji, distance_upper_bound=cap * 1.001 + 0.01,
                                 workers=max(1, int(self.threads or 1)) if len(kji) > 20000 else 1)[0]
        d[f.masks[name][kji[:, 0], kji[:, 1], kji[:, 2]]] = 0.0
        return d

    def _fill(self, rel: np.ndarray) -> None:
        """Exact combined field (float32, as the exact planner merges its maps) at domain voxels ``rel`` (N, 3)
        not yet filled. Margin groups whose pooled lower bound exceeds the voxel's upper bound are skipped."""
        f = self.fine
        rel = rel[~self.filled[rel[:, 0], rel[:, 1], rel[:, 2]]]
        if not len(rel):
            return
        kji = rel + f.domain_lo
        q = (kji - (POOL - 1) / 2.0) / POOL
        lbs, ub = [], np.full(len(kji), float(self.vcap))
        for gi, (margin, names) in enumerate(f.groups):
            gcap = f.group_caps[gi]
            pg = self.pooled.sample_group(gi, q).astype(np.float64)
            lbs.append(np.minimum(pg, gcap) - self.B - margin)
            np.minimum(ub, np.minimum(pg + self.B, gcap) - margin, out=ub)
        val = np.full(len(kji), self.vcap, np.float32)
        for gi, (margin, names) in enumerate(f.groups):
            need = np.nonzero(lbs[gi] <= ub)[0]
            if not len(need):
                continue
            gcap = f.group_caps[gi]
            d = np.full(len(need), np.inf)
            for n in names:
                if f.boxes[n] is None:
                    continue
                # the structure's box is no farther than any of its voxels: query only where it could be nearer
                blo, bhi = f.boxes[n]
                gap = np.maximum(np.maximum(blo - kji[need], kji[need] - (bhi - 1)), 0) * f.spacing_kji
                near = np.nonzero(np.sqrt((gap * gap).sum(axis=1)) < np.minimum(d, gcap))[0]
                if len(near):
                    d[near] = np.minimum(d[near], self._structure_distance(n, kji[need][near], gcap))
            v = np.minimum(d.astype(np.float32), np.float32(gcap)) - np.float32(margin)
            cur = val[need]
            np.copyto(cur, v, where=np.less(v, cur))
            val[need] = cur
        self.field[rel[:, 0], rel[:, 1], rel[:, 2]] = val
        self.filled[rel[:, 0], rel[:, 1], rel[:, 2]] = True
        self.corners_computed += len(rel)

    def exact_readings(self, kji: np.ndarray) -> np.ndarray:
        """The exact planner's trilinear readings (float32 mm) of the combined field at fine points (N, 3), from
        the exact distances at the surrounding voxel centres (no full-resolution map): the same array positions
        and the same interpolation routine as :meth:`.engine.DistanceMaps.sample_combined`."""
        c = kji - self.fine.domain_lo
        base = np.floor(c).astype(np.intp)
        hi = np.array(self.field.shape) - 1
        corners = np.concatenate([base + np.array([a, b, d]) for a in (0, 1) for b in (0, 1) for d in (0, 1)])
        np.clip(corners, 0, hi, out=corners)
        flat = np.unique((corners[:, 0] * self.field.shape[1] + corners[:, 1]) * self.field.shape[2] + corners[:, 2])
        self._fill(np.stack(np.unravel_index(flat, self.field.shape), axis=-1))
        return ndimage.map_coordinates(self.field, c.T, order=1, mode="nearest", prefilter=False)


class ScreenEval(eng.CandidateEval):
    """Screened candidates of one target; ``valid`` = proven valid; lazy exact re-scoring (see module doc)."""

    def _setup(self, scr, todo, e_kji, tip_kji, n_steps, state, lo, hi, threshold, settings, reach, worst_pts):
        self.scr, self.todo, self.e_kji, self.tip_kji, self.n_steps = scr, todo, e_kji, tip_kji, n_steps
        self.state, self.lo, self.hi, self.threshold = state, lo, hi, threshold
        self.settings, self.reach = settings, reach
        self.pos = {int(i): p for p, i in enumerate(todo)}
        self.exact_min = np.full(len(self.entries), np.nan)
        self.rescored = 0
        self.worst_pts = worst_pts
        self.probed = np.zeros(len(self.entries), bool)

    @property
    def valid(self) -> np.ndarray:
        return (self.state == VALID) | (self.state == KNOWN)

    def _scores(self, i, excess) -> np.ndarray:
        """The exact planner's score formula (element-wise, the same operations) for paths ``i`` with margin
        excess ``excess`` (mm, float64 array)."""
        s = self.settings
        wsum = s.weight_length + s.weight_clearance + s.weight_obliquity
        L, a = self.length_mm[i], self.angle_deg[i]
        return ((s.weight_length * np.clip(1 - L / max(self.reach, 1e-6), 0, 1)
                 + s.weight_clearance * np.clip(np.nan_to_num(excess, nan=0.0) / s.clearance_ref_mm, 0, 1)
                 + s.weight_obliquity * (1 - a / 90.0)) / wsum)

    def _score(self, i: int, excess) -> float:
        return float(self._scores(np.array([i]), excess)[0])

    def upper_scores(self, idx: np.ndarray) -> np.ndarray:
        """Exact score where known, else the optimistic score from the screening upper bound."""
        out = self._scores(idx, self.hi[idx] - self.threshold)
        k = self.state[idx] == KNOWN
        out[k] = self.score[idx][k]
        return out

    def upper_score(self, i: int) -> float:
        return float(self.upper_scores(np.array([i]))[0])

    def _samples(self, i: int):
        p = self.pos[i]
        frac = np.linspace(0.0, 1.0, self.n_steps[p] + 1)
        e, tip = self.e_kji[p:p + 1], self.tip_kji[p:p + 1]
        pts = (e[:, None, :] + frac[None, :, None] * (tip - e)[:, None, :])[0]
        lo_s, hi_s = self.scr.pooled_bounds(pts)
        return pts, lo_s, hi_s

    def probe(self, idx) -> None:
        """Exact reading at each path's most promising sample (one sample): a tighter upper bound of its exact
        minimum, and a proven rejection when it is below the threshold."""
        idx = [int(i) for i in idx if self.state[int(i)] in (UNKNOWN, VALID) and not self.probed[int(i)]]
        if not idx:
            return
        pts = np.array([(lambda s: s[0][s[2].argmin()])(self._samples(i)) for i in idx])
        up = self.scr.exact_readings(pts)
        for n, i in enumerate(idx):
            self.probed[i] = True
            self.hi[i] = min(self.hi[i], float(up[n]))
            if (up[n:n + 1] < self.threshold)[0]:  # the exact minimum is at most this reading
                self.state[i] = INVALID
                self.reason[i] = 4 + int(self.scr.pooled.worst_structure(((pts[n] - (POOL - 1) / 2.0) / POOL)[None])[0])
                self.score[i] = np.nan

    def rescore(self, idx) -> None:
        """Exact readings of paths ``idx`` (the exact planner's fine minimum); sets state, score and reason."""
        idx = [int(i) for i in np.atleast_1d(idx) if self.state[int(i)] in (UNKNOWN, VALID)]
        if not idx:
            return
        samples = [self._samples(i) for i in idx]
        # first the exact reading at each path's most promising sample: an upper bound of its exact minimum
        first = self.scr.exact_readings(np.array([pts[hi_s.argmin()] for pts, lo_s, hi_s in samples]))
        parts, seg = [], [0]
        for (pts, lo_s, hi_s), up in zip(samples, first.astype(np.float64)):
            pts = pts[lo_s <= min(up, hi_s.min())]  # no other sample can hold the exact minimum
            parts.append(pts)
            seg.append(seg[-1] + len(pts))
        allp = np.concatenate(parts)
        vals = self.scr.exact_readings(allp)
        self.rescored += len(idx)
        for n, i in enumerate(idx):
            v = vals[seg[n]:seg[n + 1]]
            am = int(v.argmin())
            mins = v[am:am + 1]
            self.exact_min[i] = float(mins[0])
            excess = mins - self.threshold  # float32, as in the exact planner
            self.min_excess_mm[i] = float(excess[0])
            if (mins < self.threshold)[0]:
                self.state[i] = INVALID
                q = (parts[n][am] - (POOL - 1) / 2.0) / POOL
                self.reason[i] = 4 + int(self.scr.pooled.worst_structure(q[None])[0])
                self.score[i] = np.nan
                continue
            self.state[i] = KNOWN
            self.reason[i] = -1
            self.score[i] = self._score(i, excess.astype(np.float64))

    # lazy queries --------------------------------------------------------------------------------
    def rank(self, top_n: int, separation_mm: float) -> list[int]:
        """The exact planner's :func:`.engine._rank` result, re-scoring only what can change it (in batches of
        the next ``BATCH`` paths of the optimistic order)."""
        cand = np.nonzero(self.state != INVALID)[0]
        heap = list(zip((-self.upper_scores(cand)).tolist(), cand.tolist()))
        heapq.heapify(heap)
        chosen: list[int] = []
        while heap and len(chosen) < top_n:
            if self.state[heap[0][1]] != KNOWN:
                batch = []
                while heap and len(batch) < BATCH and self.state[heap[0][1]] != KNOWN:
                    batch.append(heapq.heappop(heap)[1])
                # paths not probed yet get the one-sample upper bound first; probed ones are re-scored
                self.rescore([i for i in batch if self.probed[i]])
                self.probe(batch)
                for i in batch:
                    if self.state[i] != INVALID:
                        heapq.heappush(heap, (-self.upper_score(i), i))
                continue
            _, i = heapq.heappop(heap)
            if all(np.linalg.norm(self.entries[i] - self.entries[j]) >= separation_mm for j in chosen):
                chosen.append(int(i))
        return chosen

    def shortest_valid_length(self) -> float | None:
        """Length (mm) of the shortest valid path (the exact planner's), or None."""
        cand = np.nonzero(self.state != INVALID)[0]
        order = cand[np.argsort(self.length_mm[cand], kind="stable")].tolist()
        for n, i in enumerate(order):
            if self.state[i] == UNKNOWN:
                self.rescore([j for j in order[n:n + BATCH] if self.state[j] == UNKNOWN])
            if self.state[i] != INVALID:
                return float(self.length_mm[i])
        return None

    @property
    def unresolved(self) -> int:
        """Paths neither proven valid nor rejected (their validity never mattered to the plan)."""
        return int((self.state == UNKNOWN).sum())


def screen_paths(scr: PooledScreen, target_ras, entries: np.ndarray, needle, settings, exclusion,
                 reach_mm: float | None = None, threads: int | None = None) -> ScreenEval:
    """Screen every straight path entry -> target (+ tip overshoot) on the pooled field (module doc); the
    cheap constraints and the body check are the exact planner's."""
    maps = scr.fine
    t = np.asarray(target_ras, float)
    entries = np.asarray(entries, float).reshape(-1, 3)
    reach = needle.max_reach_mm if reach_mm is None else reach_mm
    vec = t - entries
    length = np.linalg.norm(vec, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        direction = vec / length[:, None]
    n = eng._axial_normal(maps.grid)
    angle = np.degrees(np.arcsin(np.clip(np.abs(direction @ n), 0, 1)))
    names = ["needle_length", "angle_to_axial", "entry_region", "leaves_body"] + [f"clearance:{s}" for s in maps.names]
    reason = np.full(len(entries), -1, np.int32)
    reason[length > reach] = 0
    reason[length < 1e-6] = 0
    max_angle = settings.in_plane_tolerance_deg if settings.mode == "in-plane" else settings.max_angle_deg
    reason[(reason < 0) & (angle > max_angle + 1e-9)] = 1
    if exclusion is not None:
        reason[(reason < 0) & exclusion.excluded(t, entries)] = 2
    state = np.full(len(entries), INVALID, np.int8)
    lo_b = np.full(len(entries), np.nan)
    hi_b = np.full(len(entries), np.nan)
    todo = np.nonzero(reason < 0)[0]
    step = settings.sample_step_mm
    threshold = maps.bound_mm(step) + maps.surface_offset_mm + needle.outer_radius_mm
    overshoot = needle.tip_overshoot_mm
    total = length[todo] + overshoot
    n_steps = np.ceil(total / step).astype(int)
    n_steps = ((n_steps + eng.COARSE_EVERY - 1) // eng.COARSE_EVERY) * eng.COARSE_EVERY
    e_kji = maps.ras_to_kji(entries[todo])
    tip_kji = maps.ras_to_kji(t + direction[todo] * overshoot)
    worst_pts = np.zeros((len(entries), 3))
    if len(todo):
        skip_frac = settings.skin_skip_mm / total
        coarse_step = eng.COARSE_EVERY * step
        h = maps.half_diagonal_mm
        dip = 2 * h + coarse_step / 2.0
        saturate = threshold + settings.clearance_ref_mm

        def run_chunk(g):
            idx = todo[g]
            frac = np.linspace(0.0, 1.0, n_steps[g[0]] + 1)
            fc = frac[::eng.COARSE_EVERY]
            pts = e_kji[g, None, :] + fc[None, :, None] * (tip_kji[g] - e_kji[g])[:, None, :]
            lo_s, hi_s = scr.pooled_bounds(pts)
            am = hi_s.argmin(axis=1)
            hi = hi_s[np.arange(len(g)), am]
            lo = lo_s.min(axis=1) - dip
            worst_pts[idx] = pts[np.arange(len(g)), am]
            bad = hi < threshold
            good = ~bad
            out_body = np.zeros(len(g), bool)
            if good.any():
                gg = g[good]
                ptsf = e_kji[gg, None, :] + frac[None, :, None] * (tip_kji[gg] - e_kji[gg])[:, None, :]
                insf = maps.inside_body(ptsf) | (frac[None, :] < skip_frac[gg, None])
                out_body[good] = ~insf.all(axis=1)
                fine = np.nonzero(good)[0]
                fine = fine[~out_body[fine] & (lo[fine] < saturate)]
                if len(fine):
                    sel = np.isin(np.nonzero(good)[0], fine)
                    lf, hf = scr.pooled_bounds(ptsf[sel])
                    amf = hf.argmin(axis=1)
                    hi[fine] = np.minimum(hi[fine], hf[np.arange(len(fine)), amf])
                    lo[fine] = np.maximum(lo[fine], lf.min(axis=1))
                    worst_pts[idx[fine]] = ptsf[sel][np.arange(len(fine)), amf]
                    if RESOLVE_VALIDITY:
                        _resolve(fine, lf, ptsf[sel], lo, hi, idx)
            lo_b[idx], hi_b[idx] = lo, hi
            st = np.full(len(g), UNKNOWN, np.int8)
            st[lo >= threshold] = VALID
            st[lo >= saturate] = KNOWN
            r = np.full(len(g), -1, np.int32)
            r[out_body] = 3
            viol = (~out_body) & (hi < threshold)
            st[out_body | viol] = INVALID
            if viol.any():
                q = (worst_pts[idx[viol]] - (POOL - 1) / 2.0) / POOL
                r[viol] = 4 + scr.pooled.worst_structure(q).astype(np.int32)
            reason[idx] = r
            state[idx] = st

        def _resolve(fine, lf, pf, lo, hi, idx):
            # validity of every path the bounds leave open: exact readings only at the samples whose lower bound
            # is below the threshold (elsewhere the reading clears it), so the funnel and the skin map see the
            # exact planner's valid paths
            unk = np.nonzero((lo[fine] < threshold) & (hi[fine] >= threshold))[0]
            if not len(unk):
                return
            L, P = lf[unk], pf[unk]
            cand = L < threshold
            vals = np.full(L.shape, np.inf, np.float32)
            vals[cand] = scr.exact_readings(P[cand])
            am = vals.argmin(axis=1)
            vmin = vals[np.arange(len(unk)), am]
            rows = fine[unk]
            bad = vmin < threshold  # the exact minimum is at most this reading
            hi[rows[bad]] = vmin[bad]
            worst_pts[idx[rows[bad]]] = P[bad, am[bad]]
            rest = np.where(cand, np.inf, L).min(axis=1)
            ok = ~bad
            lo[rows[ok]] = np.minimum(vmin[ok].astype(np.float64), rest[ok])

        chunks = []
        for ns in np.unique(n_steps):
            grp = np.nonzero(n_steps == ns)[0]
            size = max(1, 400_000 // (ns + 1))
            chunks += [grp[c0:c0 + size] for c0 in range(0, len(grp), size)]
        workers = max(1, int(threads or settings.threads or os.cpu_count() or 1))
        if workers > 1 and len(chunks) > 1:
            with ThreadPoolExecutor(workers) as ex:
                list(ex.map(run_chunk, chunks))
        else:
            for c in chunks:
                run_chunk(c)
    excess = lo_b - threshold  # screening lower bound; replaced by the exact excess when re-scored
    ev = ScreenEval(entries, length, angle, reason, names, excess, np.full(len(entries), np.nan), int(len(todo)))
    ev._setup(scr, todo, e_kji, tip_kji, n_steps, state, lo_b, hi_b, threshold, settings, reach, worst_pts)
    known = np.nonzero(state == KNOWN)[0]  # saturated clearance term: the exact planner's score
    ev.score[known] = ev._scores(known, np.full(len(known), settings.clearance_ref_mm))
    return ev


def shared_entry(maps, tg, evals, best, needle, settings):
    """The exact planner's shared entry (:func:`.engine._shared_entry`) from screened candidates."""
    index: dict[str, dict] = {}
    keys = None
    for t in tg:
        ev = evals[t.name]
        ok = np.nonzero(ev.state != INVALID)[0]
        d = dict(zip(eng._key(ev.entries[ok]), ok))
        index[t.name] = d
        keys = set(d) if keys is None else keys & set(d)
    keys = sorted(keys or ())
    ub = np.stack([evals[t.name].upper_scores(np.array([index[t.name][k] for k in keys], np.intp)) for t in tg],
                  axis=1) if keys else np.zeros((0, len(tg)))
    heap = list(zip((-ub.mean(axis=1)).tolist(), range(len(keys))))
    heapq.heapify(heap)
    chosen = None
    known = lambda j: all(evals[t.name].state[index[t.name][keys[j]]] == KNOWN for t in tg)  # noqa: E731
    while heap:
        if known(heap[0][1]):
            chosen = heapq.heappop(heap)[1]
            break
        batch = []
        while heap and len(batch) < BATCH and not known(heap[0][1]):
            batch.append(heapq.heappop(heap)[1])
        for t in tg:
            evals[t.name].rescore([index[t.name][keys[j]] for j in batch])
        for j in batch:
            if known(j):
                sc = [float(evals[t.name].score[index[t.name][keys[j]]]) for t in tg]
                heapq.heappush(heap, (-float(np.array([sc]).mean(axis=1)[0]), j))
    valid = {t.name: evals[t.name].valid for t in tg}
    proven = sum(all(valid[t.name][index[t.name][k]] for t in tg) for k in keys)
    if chosen is None:
        return None, "no single skin entry gives a safe path to every target under the current constraints"
    k = keys[chosen]
    trs, tradeoff = [], {}
    for t in tg:
        i = index[t.name][k]
        tr = eng._make_trajectory(maps, t, evals[t.name].entries[i], evals[t.name], i, needle, settings, 1,
                                  f"{t.name}-shared")
        trs.append(tr)
        b = best[t.name]
        tradeoff[t.name] = {"score_loss": round(b.score - tr.score, 4),
                            "length_increase_mm": round(tr.length_mm - b.length_mm, 2),
                            "min_margin_excess_loss_mm": round(b.min_margin_excess_mm - tr.min_margin_excess_mm, 2)}
    dirs = [(tr.target_ras - tr.entry_ras) / tr.length_mm for tr in trs]
    fan = max(math.degrees(math.acos(np.clip(a @ b, -1, 1))) for a in dirs for b in dirs)
    unresolved = len(keys) - proven
    note = f"{proven} skin entries reach all targets safely" + (
        f" ({unresolved} more within the screening bound not checked)" if unresolved else "")
    return eng.SharedEntryPlan(np.asarray(trs[0].entry_ras), trs, tradeoff, fan), note

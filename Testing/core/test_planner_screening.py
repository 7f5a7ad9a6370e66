"""Pooled screening with exact re-scoring returns exactly the exact planner's plan (ranked entries and scores,
clearances, shared entry, shortest safe length), on the phantom and on a random CT, with the default and the
clearance-blind ranking; its bound holds; the independent oracle finds no violated margin."""
import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

from planner_oracle import Oracle
from SmartBiopsyCoreLib.geometry import RasVolume
from SmartBiopsyCoreLib.phantom import abdomen as synthetic
from TrajectoryPlannerLib.errors import TrajectoryPlannerError
from TrajectoryPlannerLib.planning import engine, risk, screening

from test_planner_margins import BESIDE, BLIND, MARGINS, ORACLE_LABELS, _slack

DEFAULT = dict()
#: the exact maps are float32 from ``edt``; re-scoring rounds exact KD-tree distances to float32, which can differ
#: by an ulp (measured: 1 ulp of a ~10 mm excess, 4e-8 in score)
SCORE_TOL = 1e-6


def _plan_pair(ct, targets, labelmaps, **kw):
    out = {}
    for mode in ("exact", "pooled"):
        out[mode] = engine.plan(ct, targets, labelmaps=labelmaps, settings=engine.PlanSettings(screening=mode, **kw))
    return out["exact"], out["pooled"]


def _assert_same_plan(a, b):
    """Identical ranked lists per target (entries, scores, clearances), shared entry, shortest safe length."""
    assert len(a.trajectories) == len(b.trajectories) > 0
    for x, y in zip(a.trajectories, b.trajectories):
        assert (x.target, x.rank, x.name) == (y.target, y.rank, y.name)
        assert np.array_equal(x.entry_ras, y.entry_ras), x.name
        assert abs(x.score - y.score) <= SCORE_TOL, (x.name, x.score, y.score)
        assert x.clearance_mm == pytest.approx(y.clearance_mm, abs=1e-9)
    assert a.shortest_safe_length_mm == b.shortest_safe_length_mm
    assert set(a.failures) == set(b.failures)  # the funnel counts in the messages come from the screening
    if a.shared_entry is None:
        assert b.shared_entry is None
    else:
        assert np.array_equal(a.shared_entry.entry_ras, b.shared_entry.entry_ras)
        assert [t.score for t in a.shared_entry.trajectories] == pytest.approx(
            [t.score for t in b.shared_entry.trajectories], abs=SCORE_TOL)
        for t, v in a.shared_entry.tradeoff.items():
            assert v == pytest.approx(b.shared_entry.tradeoff[t], abs=1e-4)  # rounded to 4 decimals


@pytest.fixture(scope="module")
def phantom():
    return synthetic.make_abdomen()


@pytest.mark.parametrize("kw", [DEFAULT, BLIND], ids=["default-ranking", "clearance-blind"])
def test_pooled_screening_returns_the_exact_plan_on_the_phantom(phantom, kw):
    ct, labels, targets = phantom
    a, b = _plan_pair(ct, targets, [(labels, synthetic.RISK_LABELS)], **kw)
    _assert_same_plan(a, b)
    d = json.loads(json.dumps(b.to_dict()))
    assert d["screening"]["method"] == "pooled" and "unresolved_near_margin" in d["screening"]["definition"]
    assert "screening" not in a.to_dict()
    # the funnel holds proven rejections only; the exact planner rejects at least as many
    for t in ("A", "B", "C"):
        assert sum(b.rejections[t].values()) + d["screening"]["unresolved_near_margin"][t] <= b.candidates[t]
        assert sum(b.rejections[t].values()) <= sum(a.rejections[t].values())
    # the skin map counts proven-safe entries only: never more targets than the exact planner's
    assert np.array_equal(a.skin_points_ras, b.skin_points_ras)
    assert np.all(b.skin_targets_reachable <= a.skin_targets_reachable)


def _random_ct(seed):
    """A random body (ellipsoid) with bone and gas blobs from HU and two labelled structures, on an anisotropic
    random grid; targets: random body voxels clear of every structure."""
    rng = np.random.default_rng(seed)
    sp = np.array([rng.uniform(0.9, 1.6), rng.uniform(0.9, 1.6), rng.uniform(1.0, 2.5)])  # i, j, k mm
    shape = (int(90 / sp[2]), int(180 / sp[1]), int(220 / sp[0]))
    k, j, i = np.indices(shape, dtype=float)
    c = np.array(shape) / 2.0
    r = ((k - c[0]) * sp[2] / 60) ** 2 + ((j - c[1]) * sp[1] / 75) ** 2 + ((i - c[2]) * sp[0] / 95) ** 2
    body = r < 1.0
    a = np.full(shape, -1000.0)
    a[body] = 40.0
    f = ndimage.gaussian_filter(rng.random(shape), 3.0)
    a[body & (f > np.quantile(f[body], 0.97))] = 500.0
    g = ndimage.gaussian_filter(rng.random(shape), 3.0)
    a[body & (g < np.quantile(g[body], 0.02)) & (r < 0.7)] = -800.0
    lab = np.zeros(shape, np.uint8)
    h = ndimage.gaussian_filter(rng.random(shape), 4.0)
    lab[body & (h > np.quantile(h[body], 0.995)) & (r < 0.8)] = 1
    lab[body & (h < np.quantile(h[body], 0.005)) & (r < 0.8)] = 2
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    ct = RasVolume(a.astype(np.int16), affine, "random ct")
    labels = RasVolume(lab, affine, "random labels")
    clear = body & (r < 0.5) & (ndimage.distance_transform_edt((lab == 0) & (a == 40.0), sampling=sp[::-1]) > 15)
    pick = np.argwhere(clear)[rng.choice(int(clear.sum()), 3, replace=False)]
    targets = [{"name": n, "point_ras": ct.ijk_to_ras_points(p[::-1].astype(float))[0].tolist()}
               for n, p in zip("ABC", pick)]
    return ct, labels, targets


@pytest.mark.parametrize("seed", [4, 9])
@pytest.mark.parametrize("kw", [DEFAULT, dict(BLIND, top_n=40)], ids=["default-ranking", "clearance-blind"])
def test_pooled_screening_returns_the_exact_plan_on_a_random_ct(seed, kw):
    ct, labels, targets = _random_ct(seed)
    a, b = _plan_pair(ct, targets, [(labels, {1: "aorta", 2: "kidney"})], allow_partial=True, **kw)
    _assert_same_plan(a, b)
    assert len({t.target for t in a.trajectories}) >= 2


def test_pooled_bounds_contain_the_exact_planner_reading(phantom):
    """At random points (and at voxel centres, where the interpolation is exact): lower <= exact <= upper."""
    ct, labels, targets = phantom
    rm = risk.build_risk_model(ct, [(labels, synthetic.RISK_LABELS)])
    exact = engine.DistanceMaps(rm, 30.0)
    scr = screening.PooledScreen(rm, 30.0, None, None)
    rng = np.random.default_rng(0)
    shape = np.array(ct.array.shape)
    pts = np.concatenate([rng.uniform(2, shape - 3, (20000, 3)), rng.integers(2, shape - 3, (5000, 3)).astype(float)])
    e = exact.sample_combined(pts).astype(float)
    lo, hi = scr.pooled_bounds(pts)
    assert np.all(lo <= e) and np.all(e <= hi)
    # the bound is used: some reading lies within 10 % of it on either side
    assert np.max(e - lo) > 0.9 * (hi - lo).max() / 2 or np.max(hi - e) > 0.9 * (hi - lo).max() / 2
    # the exact re-scoring reads the exact planner's values, without its maps
    assert np.array_equal(scr.exact_readings(pts[:3000]), exact.sample_combined(pts[:3000]))


@pytest.fixture(scope="module")
def margins_case():
    return synthetic.make_abdomen(spacing=(1.0, 1.0, 1.0), fov_mm=(360.0, 300.0, 100.0))


def test_pooled_clearance_blind_plan_keeps_every_margin_by_the_oracle(margins_case):
    ct, labels, targets = margins_case
    a, b = _plan_pair(ct, targets + BESIDE, [(labels, synthetic.RISK_LABELS)], **BLIND)
    _assert_same_plan(a, b)
    assert len(b.trajectories) >= 200
    # the oracle on the 50 returned paths closest to their margins (the full set: test_planner_margins, same plan)
    closest = dataclasses.replace(b, trajectories=sorted(b.trajectories, key=lambda t: t.min_margin_excess_mm)[:50])
    worst = _slack(closest, Oracle(labels, ORACLE_LABELS), MARGINS)
    assert min(worst.values()) >= -1e-6, worst


def test_unknown_screening_is_refused():
    with pytest.raises(TrajectoryPlannerError, match="screening"):
        engine.PlanSettings(screening="fast")


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 2.0), (1.0, 1.0, 1.0)])
def test_screening_claims_agree_with_the_exact_evaluation_of_every_candidate(spacing):
    """Per candidate path: screened as rejected -> the exact planner rejects it; proven valid -> it accepts it;
    score taken without re-scoring -> the exact score; exact minimum reading within the screening bounds."""
    ct, labels, targets = synthetic.make_abdomen(spacing=spacing, fov_mm=(360.0, 300.0, 100.0))
    s = engine.PlanSettings()
    needle = engine.get_needle(engine.DEFAULT_NEEDLE)
    rm = risk.build_risk_model(ct, [(labels, synthetic.RISK_LABELS)], exclusion=risk.EntryExclusion())
    entries = engine.oblique_entries(rm, s.entry_spacing_mm)
    tg = engine._parse_targets(targets + BESIDE)  # paths grazing every structure's margin
    domain = engine._path_domain(ct, tg, {t.name: entries for t in tg}, needle, s, rm.exclusion)
    exact = engine.DistanceMaps(rm, s.distance_cap_mm, None, 0.0, domain)
    scr = screening.PooledScreen(rm, s.distance_cap_mm, None, domain)
    n_claims = 0
    for t in tg:
        ev = engine.evaluate_paths(exact, t.point_ras, entries, needle, s, rm.exclusion)
        sc = screening.screen_paths(scr, t.point_ras, entries, needle, s, rm.exclusion)
        rejected = sc.state == screening.INVALID
        assert not (ev.valid & rejected).any()
        proven = sc.valid
        assert ev.valid[proven].all()
        known = sc.state == screening.KNOWN
        assert np.allclose(sc.score[known], ev.score[known], rtol=0, atol=SCORE_TOL)
        n_claims += int(proven.sum() + rejected.sum())
        # exact minimum reading (not shortened by the exact planner's saturation) inside the bounds
        m = ev.valid & (ev.min_excess_mm < s.clearance_ref_mm) & ~rejected
        reading = ev.min_excess_mm[m] + sc.threshold
        assert np.all(sc.lo[m] <= reading + 1e-6) and np.all(reading <= sc.hi[m] + 1e-6)
    assert n_claims > 1000


def test_pooled_screening_in_plane_and_too_short_needle_match_the_exact_planner(phantom):
    from TrajectoryPlannerLib.planning import needles

    ct, labels, targets = phantom
    a, b = _plan_pair(ct, targets[1:], [(labels, synthetic.RISK_LABELS)], mode="in-plane", top_n=3)
    _assert_same_plan(a, b)
    core = needles.CoreNeedle(18, 1.27, 60.0, 20.0, 5.0, 22.0)
    short = needles.NeedleModel("short", core, needles.CoaxialIntroducer(17, 1.473, 30.0))
    needed = {}
    for mode in ("exact", "pooled"):
        with pytest.raises(engine.NoSafePathError) as e:
            engine.plan(ct, targets[:1], short, labelmaps=[(labels, synthetic.RISK_LABELS)],
                        settings=engine.PlanSettings(screening=mode))
        needed[mode] = e.value.needed_length_mm
        # every candidate was resolved before the refusal: none is left unresolved in the funnel
        assert set(e.value.rejections) <= {"needle_length", "angle_to_axial", "entry_region", "leaves_body"} | {
            f"clearance:{n}" for n in MARGINS}
    assert needed["exact"] is not None and needed["pooled"] == needed["exact"]


def test_resolving_every_open_path_gives_the_exact_funnel_totals_and_skin_map(phantom, monkeypatch):
    monkeypatch.setattr(screening, "RESOLVE_VALIDITY", True)
    ct, labels, targets = phantom
    a, b = _plan_pair(ct, targets, [(labels, synthetic.RISK_LABELS)])
    _assert_same_plan(a, b)
    assert b.unresolved == {"A": 0, "B": 0, "C": 0}
    for t in ("A", "B", "C"):
        assert sum(b.rejections[t].values()) == sum(a.rejections[t].values())
    assert np.array_equal(b.skin_targets_reachable, a.skin_targets_reachable)
    assert b.shared_entry_note == a.shared_entry_note

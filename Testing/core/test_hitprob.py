"""Hit probability of a target against a brute-force oracle on the phantom, and target selection by it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hitprob_oracle import brute_force_hit_probability, notch_at_centre, region_fraction
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyLib.characterise import hitprob, targets

NEEDLE = "15G/16G-16cm"  # the default needle set: 19 mm side notch, 16 G core
# Registration error used against the oracle: anisotropic (SD 1, 1.4, 2 mm along R, A, S; RMS 2.6 mm).
REG_COV = np.diag([1.0, 2.0, 4.0])

# Phantom seed 0, truth habitat map (MRI grid 1.5 x 1.5 x 6 mm): shallow points (depth 1.5-3 mm) whose
# hit probability is neither 0 nor 1, so that every error term matters. (region, kji, direction or None)
ORACLE_TARGETS = [
    ("A", (18, 102, 149), None),
    ("B", (16, 118, 149), (0.6, 0.64, 0.48)),
    ("C", (18, 121, 171), None),
]


@pytest.fixture(scope="module")
def hab(phantom0):
    return phantom0.truth.mri_habitats


def _point(hab, kji):
    return hab.kji_to_ras_points(np.array(kji)[None])[0]


# ---------------------------------------------------------------------------------------------- acceptance
@pytest.mark.parametrize("region,kji,direction", ORACLE_TARGETS)
def test_hit_probability_agrees_with_brute_force_oracle_within_2_points(hab, region, kji, direction):
    point = _point(hab, kji)
    fast = hitprob.hit_probability(hab, region, point, registration_error=REG_COV, needle=NEEDLE,
                                   direction=direction, n_samples=40000, seed=1)
    code = hitprob.REGION_CODES[region]
    p, se = brute_force_hit_probability(hab, code, point, REG_COV, 2.0, direction, NEEDLE, "side-notch", 2000, seed=11)
    assert 0.05 < p < 0.98  # the point is informative: neither a sure hit nor a sure miss
    assert abs(fast.probability - p) <= 0.02, f"{region}: fast {fast.probability:.4f} vs brute force {p:.4f} ± {se:.4f}"


def test_notch_fractions_match_brute_force_voxelisation_draw_by_draw(hab):
    """Same placements for both: isolates the notch geometry and the region test from the random numbers."""
    rng = np.random.default_rng(3)
    geo = hitprob.NotchGeometry.from_needle(NEEDLE)
    for region, kji, direction in ORACLE_TARGETS:
        point = _point(hab, kji)
        centres, axes = hitprob.draw_placements(point, 150, hitprob.RegistrationError(REG_COV), 2.0, 0.0, direction,
                                                rng)
        code = hitprob.REGION_CODES[region]
        fast = hitprob.notch_fractions(hab, code, centres, axes, geo)
        slow = np.array([region_fraction(notch_at_centre(c, a, NEEDLE, "side-notch"), hab, code)[0]
                         for c, a in zip(centres, axes)])
        assert np.abs(fast - slow).max() < 0.08, region
        assert np.abs(fast - slow).mean() < 0.02, region
        assert np.mean((fast >= 0.5) != (slow >= 0.5)) <= 0.03, region


def test_certain_shortcut_only_skips_notches_wholly_inside_or_outside(hab):
    """Placements the fast path settles without quadrature (fraction exactly 1 or 0) must be wholly inside or
    outside the region by brute force; draws around a point 17 mm deep straddle the margin (about 16 mm)."""
    from scipy import ndimage

    m = hab.array == 1
    depth = ndimage.distance_transform_edt(np.pad(m, 1), sampling=hab.spacing[::-1])[1:-1, 1:-1, 1:-1]
    kji = np.argwhere(m & (np.abs(depth - 17.0) < 0.8))[0]
    rng = np.random.default_rng(8)
    centres, axes = hitprob.draw_placements(_point(hab, kji), 400, hitprob.RegistrationError.from_sigma(4.0), 2.0,
                                            0.0, None, rng)
    geo = hitprob.NotchGeometry.from_needle(NEEDLE)
    radius = float(np.linalg.norm(geo.quadrature(), axis=1).max())
    certain = hitprob._certain_fractions(hab, 1, centres, radius)
    settled = np.flatnonzero(np.isfinite(certain))
    assert 50 <= settled.size < 400  # some settled, some not
    slow = np.array([region_fraction(notch_at_centre(centres[n], axes[n], NEEDLE, "side-notch"), hab, 1)[0]
                     for n in settled])
    assert np.array_equal(slow, certain[settled])


def test_tip_distal_notch_agrees_with_brute_force_draw_by_draw(hab):
    rng = np.random.default_rng(5)
    geo = hitprob.NotchGeometry.from_needle(NEEDLE, "tip-distal")
    assert geo.shape == "cylinder" and geo.length_mm == 20.0 and geo.radius_mm == 1.0
    region, kji, direction = ORACLE_TARGETS[1]
    point = _point(hab, kji)
    centres, axes = hitprob.draw_placements(point, 150, hitprob.RegistrationError(REG_COV), 2.0, 0.0, direction, rng)
    fast = hitprob.notch_fractions(hab, 2, centres, axes, geo)
    slow = np.array([region_fraction(notch_at_centre(c, a, NEEDLE, "tip-distal"), hab, 2)[0]
                     for c, a in zip(centres, axes)])
    assert np.abs(fast - slow).mean() < 0.02 and np.abs(fast - slow).max() < 0.1


# ---------------------------------------------------------------------------------------------- error model
def test_placement_draws_have_the_stated_error_spread():
    """Registration covariance plus a 2-D lateral error of 2 mm RMS perpendicular to the needle, none along it."""
    reg = hitprob.RegistrationError(REG_COV)
    d = np.array([0.0, 0.6, 0.8])
    c, axes = hitprob.draw_placements(np.zeros(3), 200000, reg, 2.0, 0.0, d, np.random.default_rng(0))
    cov = np.cov(c.T)
    lateral = np.eye(3) - np.outer(d, d)
    expected = REG_COV + (2.0 ** 2 / 2.0) * lateral
    assert np.allclose(cov, expected, atol=0.05)
    assert np.allclose(axes, d)
    _, free = hitprob.draw_placements(np.zeros(3), 20000, reg, 2.0, 0.0, None, np.random.default_rng(0))
    assert np.allclose(free[:, 2], 0.0) and np.allclose(np.linalg.norm(free, axis=1), 1.0)
    angle = np.degrees(np.arctan2(free[:, 1], free[:, 0])) % 180.0
    assert np.histogram(angle, bins=6, range=(0, 180))[0].min() > 20000 / 6 * 0.9  # uniform in the axial plane


def test_registration_error_constructors():
    assert hitprob.RegistrationError.from_rms(3.0).rms_mm == pytest.approx(3.0)
    assert hitprob.RegistrationError.from_sigma(1.0).rms_mm == pytest.approx(np.sqrt(3.0))
    p95 = hitprob.RegistrationError.from_p95(4.0)
    r = np.linalg.norm(np.random.default_rng(0).multivariate_normal(np.zeros(3), p95.covariance_mm2, 200000), axis=1)
    assert np.percentile(r, 95) == pytest.approx(4.0, rel=0.01)
    rot = hitprob.RegistrationError(REG_COV).rotated(np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]]))
    assert np.allclose(np.diag(rot.covariance_mm2), [2.0, 1.0, 4.0])
    with pytest.raises(InputDataError):
        hitprob.RegistrationError(-np.eye(3))
    with pytest.raises(InputDataError):
        hitprob.RegistrationError.from_rms(float("nan"))


def test_needle_model_carries_the_default_lateral_error():
    from TrajectoryPlannerLib.errors import TrajectoryPlannerError
    from TrajectoryPlannerLib.planning import needles

    for name in needles.needle_names():
        assert needles.get_needle(name).placement_error_lateral_mm == 2.0
        assert needles.get_needle(name).to_dict()["placement_error_lateral_mm"] == 2.0
    assert hitprob.lateral_error_for(None) == 2.0
    m = needles.get_needle(NEEDLE)
    with pytest.raises(TrajectoryPlannerError, match="lateral placement error"):
        needles.NeedleModel("bad", m.core, m.introducer, placement_error_lateral_mm=-1.0)


# ---------------------------------------------------------------------------------------------- behaviour
def _slab(shape=(30, 60, 60), lo=10, hi=20):
    grid = make_grid((0, 0, 0), (1.0, 1.0, 1.0), shape)
    lab = np.zeros(shape, np.uint8)
    lab[lo:hi, 5:55, 5:55] = 1
    return RasVolume(lab, grid)


def test_without_errors_a_centred_notch_is_a_certain_hit_and_an_outside_one_a_certain_miss():
    vol = _slab()
    kw = dict(registration_error=0.0, lateral_error_mm=0.0, n_samples=200, direction=(1, 0, 0))
    assert hitprob.hit_probability(vol, "A", (30, 30, 14.5), **kw).probability == 1.0
    assert hitprob.hit_probability(vol, "A", (30, 30, 25.0), **kw).probability == 0.0
    assert hitprob.hit_probability(vol, "B", (30, 30, 14.5), **kw).probability == 0.0
    # a notch half in, half out along its axis: 19 mm notch centred 0.5 mm inside the region's end face (x = 4.5)
    half = hitprob.hit_probability(vol, "A", (5.0, 30, 14.5), **kw)
    assert half.mean_notch_fraction == pytest.approx(0.5, abs=0.06)


def test_hit_probability_falls_with_larger_errors_and_is_reproducible():
    vol = _slab(lo=12, hi=18)  # 6 mm thick: depth 3 mm
    kw = dict(n_samples=4000, seed=2)
    small = hitprob.hit_probability(vol, "A", (30, 30, 14.5), registration_error=0.5, **kw)
    large = hitprob.hit_probability(vol, "A", (30, 30, 14.5), registration_error=4.0, **kw)
    assert large.probability < small.probability - 10 * large.standard_error
    again = hitprob.hit_probability(vol, "A", (30, 30, 14.5), registration_error=4.0, **kw)
    assert again.probability == large.probability
    assert large.standard_error == pytest.approx(np.sqrt(large.probability * (1 - large.probability) / 4000))


def test_result_states_definition_and_error_inputs():
    r = hitprob.hit_probability(_slab(), "A", (30, 30, 14.5), registration_error=1.2, n_samples=500)
    d = json.loads(json.dumps(r.to_dict()))
    assert "at least 50% of the notch volume" in d["definition"]
    assert d["registration_error"]["rms_mm"] == pytest.approx(1.2)
    assert d["needle_lateral_rms_mm"] == 2.0 and d["direction_source"] == hitprob.DIRECTION_AXIAL_UNIFORM
    assert d["notch"]["length_mm"] == 19.0 and d["notch"]["mode"] == "side-notch"
    assert d["n_samples"] == 500 and d["seed"] == 0 and 0 <= d["standard_error"] <= 0.5 / np.sqrt(500)


def test_rejects_unknown_region_too_few_samples_and_bad_fraction():
    vol = _slab()
    with pytest.raises(InputDataError, match="region"):
        hitprob.hit_probability(vol, "D", (30, 30, 15))
    with pytest.raises(InputDataError, match="samples"):
        hitprob.hit_probability(vol, "A", (30, 30, 15), n_samples=10)
    with pytest.raises(InputDataError, match="fraction"):
        hitprob.hit_probability(vol, "A", (30, 30, 15), min_fraction=0.0)
    with pytest.raises(InputDataError, match="direction"):
        hitprob.hit_probability(vol, "A", (30, 30, 15), direction=(0, 0, 0))


def test_target_selection_prefers_hit_probability_over_depth():
    """A small ball (depth 5.5 mm) joined to a wide 10 mm slab (depth 4.5 mm): the ball is the deepest point,
    but a 19 mm in-plane notch leaves it; the slab's centre is hit far more often and must be chosen."""
    shape = (40, 100, 100)
    k, j, i = np.meshgrid(np.arange(40), np.arange(100), np.arange(100), indexing="ij")
    lab = np.zeros(shape, np.uint8)
    lab[15:25, 10:90, 50:90] = 1
    lab[((i - 30) ** 2 + (j - 50) ** 2 + (k - 20) ** 2) <= 36] = 1
    lab[20, 50, 36:50] = 1  # one component
    vol = RasVolume(lab, make_grid((0, 0, 0), (1.0, 1.0, 1.0), shape))
    (t,) = targets.plan_targets(vol, predicted_tre_mm=1.0)
    deepest = t.candidates[0]
    assert deepest["point_ras"] == [30.0, 50.0, 20.0]  # the ball's centre is the first candidate
    assert t.point_ras[0] >= 50  # chosen in the slab
    assert t.hit_probability > deepest["hit_probability"] + 5 * t.hit_probability_se
    assert t.hit_probability == max(c["hit_probability"] for c in t.candidates)
    assert t.depth_mm < deepest["depth_mm"] and "highest hit probability" in t.selection
    assert t.hit_model["registration_error"]["rms_mm"] == pytest.approx(1.0)
    assert "at least 50%" in t.hit_definition
    old = targets.plan_targets(vol, predicted_tre_mm=1.0, hit_samples=0)[0]
    assert old.point_ras == [30.0, 50.0, 20.0] and old.hit_probability is None


def test_ties_go_to_the_deepest_candidate():
    vol = _slab(lo=4, hi=26)  # 22 mm thick: every candidate is a sure hit, so the deepest one is kept
    (t,) = targets.plan_targets(vol, predicted_tre_mm=0.5)
    assert all(c["hit_probability"] == 1.0 for c in t.candidates)
    assert t.hit_probability == 1.0
    assert t.depth_mm == pytest.approx(max(c["depth_mm"] for c in t.candidates))
    assert t.candidates[0]["point_ras"] == t.point_ras


def test_phantom_targets_carry_hit_probability_in_json(hab, tmp_path):
    ts = targets.plan_targets(hab, predicted_tre_mm=1.5)
    assert [t.region for t in ts] == ["A", "B", "C"]
    for t in ts:
        kji = np.round(hab.ras_to_ijk_points(t.point_ras)[0]).astype(int)[::-1]
        assert hab.array[tuple(kji)] == hitprob.REGION_CODES[t.region]
        assert t.hit_probability >= max(c["hit_probability"] for c in t.candidates) - t.hit_probability_se
        assert len(t.candidates) >= 2
    data = json.loads(open(targets.write_targets_json(ts, tmp_path / "t.json")).read())
    assert all(0 <= d["hit_probability"] <= 1 and d["hit_definition"] for d in data["targets"])


def test_planned_path_is_evaluated_in_the_habitat_maps_world():
    """A trajectory in CT world through a rotated + shifted registration gives exactly the probability of the
    same notch evaluated directly in the MRI world (direction and covariance carried back)."""
    vol = _slab(lo=12, hi=18)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # 90 deg about R: MRI A -> CT S
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rot, [5.0, -7.0, 3.0]
    point_mri, d_mri = np.array([30.0, 30.0, 14.5]), np.array([1.0, 0.0, 0.0])
    target_ct = rot @ point_mri + m[:3, 3]
    entry_ct = target_ct - 80.0 * (rot @ d_mri)
    cov_ct = np.diag([0.25, 4.0, 0.25])  # large along CT A = MRI S: across the 6 mm slab
    (planned,) = hitprob.planned_hit_probabilities(vol, [{"name": "T", "region": "A", "entry_ras": entry_ct,
                                                           "target_ras": target_ct}], m, cov_ct, n_samples=3000)
    direct = hitprob.hit_probability(vol, "A", point_mri, registration_error=rot.T @ cov_ct @ rot, direction=d_mri,
                                     n_samples=3000)
    assert planned.probability == pytest.approx(direct.probability, abs=1e-12)
    assert np.allclose(planned.point_ras, point_mri) and np.allclose(planned.direction_ras, d_mri)
    assert planned.direction_source == hitprob.DIRECTION_PLANNED
    wrong = hitprob.hit_probability(vol, "A", point_mri, registration_error=cov_ct, direction=d_mri, n_samples=3000)
    assert wrong.probability > direct.probability + 0.1  # the covariance left in CT axes would be too optimistic

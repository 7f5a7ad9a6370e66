"""Needle detection in a confirmation CT: axis, tip, planned-vs-actual error, refusals."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyCoreLib.errors import InputDataError, SmartBiopsyError
from SmartBiopsyLib.sampling.needle import NeedleNotFoundError, detect_needle, placement_error
from SmartBiopsyLib.sampling.needle_sim import simulate_confirmation_ct


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _angle_deg(a, b):
    return float(np.degrees(np.arccos(np.clip(abs(_unit(a) @ _unit(b)), -1, 1))))


@pytest.fixture(scope="module")
def body_ct():
    """Synthetic CT (HU, 1 x 1 x 2 mm): air, water-like body, a fat block and a muscle block, 10 HU noise."""
    rng = np.random.default_rng(11)
    shape = (80, 160, 160)
    arr = np.full(shape, -1000.0, np.float32)
    jj, ii = np.mgrid[0:160, 0:160]
    body = ((ii - 80) / 72.0) ** 2 + ((jj - 80) / 62.0) ** 2 < 1
    arr[:, body] = 20.0
    fat = body & (ii > 25) & (ii < 70) & (jj > 40) & (jj < 120)
    arr[:, fat] = -100.0
    arr[:, 50:110, 90:130] = 55.0
    arr += rng.normal(0, 10, shape).astype(np.float32)
    return RasVolume(np.rint(arr).astype(np.int16), make_grid([-80.0, -80.0, -80.0], [1.0, 1.0, 2.0], shape), "ct")


TARGET = np.array([3.3, -2.7, 1.1])
DIRECTIONS = {
    "in-plane-LR": (1.0, 0.0, 0.0),
    "in-plane-AP": (0.0, 1.0, 0.0),
    "in-plane-oblique": (1.0, 1.0, 0.0),
    "cranio-caudal": (0.0, 0.0, 1.0),
    "double-oblique-1": (1.0, 0.5, 0.7),
    "double-oblique-2": (-0.3, 1.0, -0.6),
    "steep": (0.2, -0.4, 1.0),
}


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_finds_tip_within_1mm_and_axis_within_2deg(body_ct, name):
    d = _unit(DIRECTIONS[name])
    entry = TARGET - 70.0 * d
    sim = simulate_confirmation_ct(body_ct, entry, TARGET, lateral_error_mm=2.0, depth_error_mm=-3.0, seed=5)
    det = detect_needle(sim.ct, entry, TARGET, target_name="A")
    assert np.linalg.norm(det.tip_ras - sim.truth.tip_ras) <= 1.0
    assert _angle_deg(det.axis, sim.truth.axis) <= 2.0
    # the planned-vs-actual split reproduces the simulated placement error
    assert det.depth_error_mm == pytest.approx(-3.0, abs=1.0)
    assert det.lateral_error_mm == pytest.approx(2.0, abs=1.0)
    assert det.axis @ d > 0  # points towards the tip
    assert det.visible_length_mm > 40.0
    json.dumps(det.to_dict())


def test_accuracy_holds_over_several_placements_and_noise_levels(body_ct):
    rng = np.random.default_rng(2)
    tip_err, ang_err = [], []
    for trial in range(6):
        d = _unit(rng.normal(size=3))
        target = TARGET + rng.uniform(-10, 10, 3)
        entry = target - 65.0 * d
        sim = simulate_confirmation_ct(body_ct, entry, target, lateral_error_mm=rng.uniform(0, 6),
                                       depth_error_mm=rng.uniform(-8, 8), noise_sd_hu=[5, 20, 40][trial % 3],
                                       seed=trial)
        det = detect_needle(sim.ct, entry, target)
        tip_err.append(np.linalg.norm(det.tip_ras - sim.truth.tip_ras))
        ang_err.append(_angle_deg(det.axis, sim.truth.axis))
    assert max(tip_err) <= 1.0, tip_err
    assert max(ang_err) <= 2.0, ang_err


def test_bright_bone_beside_the_path_does_not_pull_the_axis(body_ct):
    arr = body_ct.array.copy()
    # a cortical-bone-like slab (1900 HU) 6 mm beside the planned line, inside the search cylinder
    arr[38:44, 95:100, 60:110] = 1900
    ct = body_ct.with_array(arr)
    d = _unit([1.0, 0.0, 0.15])
    entry = TARGET - 70.0 * d
    sim = simulate_confirmation_ct(ct, entry, TARGET, seed=1)
    det = detect_needle(sim.ct, entry, TARGET)
    assert np.linalg.norm(det.tip_ras - sim.truth.tip_ras) <= 1.0
    assert _angle_deg(det.axis, sim.truth.axis) <= 2.0


def test_end_cut_needle_model_from_catalogue_is_detected(body_ct):
    d = _unit([0.3, 0.9, 0.3])
    entry = TARGET - 80.0 * d
    sim = simulate_confirmation_ct(body_ct, entry, TARGET, "17G/18G-endcut-20mm", depth_error_mm=4.0, seed=3)
    det = detect_needle(sim.ct, entry, TARGET, needle="17G/18G-endcut-20mm")
    assert np.linalg.norm(det.tip_ras - sim.truth.tip_ras) <= 1.0
    assert det.depth_error_mm == pytest.approx(4.0, abs=1.0)


def test_refuses_when_no_needle_is_present(body_ct):
    with pytest.raises(NeedleNotFoundError) as exc:
        detect_needle(body_ct, TARGET - [70.0, 0, 0], TARGET, target_name="A")
    msg = str(exc.value)
    assert "no metal needle" in msg and "target A" in msg and "15 mm" in msg
    assert "\n" not in msg


def test_refuses_needle_far_from_plan_and_names_the_distance(body_ct):
    d = _unit([1.0, 0.2, 0.0])
    offset = np.array([0.0, 0.0, 30.0])  # real needle 30 mm cranial of the plan, parallel to it
    sim = simulate_confirmation_ct(body_ct, TARGET - 70 * d + offset, TARGET + offset, seed=2)
    with pytest.raises(NeedleNotFoundError) as exc:
        detect_needle(sim.ct, TARGET - 70 * d, TARGET, target_name="B")
    m = re.search(r"nearest needle-like metal object is (\d+) mm", str(exc.value))
    assert m, str(exc.value)
    assert abs(int(m.group(1)) - 30) <= 2
    # a wider search radius finds it
    det = detect_needle(sim.ct, TARGET - 70 * d, TARGET, search_radius_mm=40.0)
    assert det.lateral_error_mm == pytest.approx(30.0, abs=1.0)


def test_short_metal_fragment_is_not_taken_for_a_needle(body_ct):
    arr = body_ct.array.copy()
    arr[40, 78:80, 80:84] = 2500  # a 4 mm clip on the planned path
    with pytest.raises(NeedleNotFoundError, match="too short"):
        detect_needle(body_ct.with_array(arr), TARGET - [70.0, 0, 0], TARGET, target_name="C")


def test_invalid_plan_is_refused(body_ct):
    with pytest.raises(InputDataError, match="coincide"):
        detect_needle(body_ct, TARGET, TARGET + 0.1)
    with pytest.raises(InputDataError, match="not a finite"):
        detect_needle(body_ct, [np.nan, 0, 0], TARGET)
    with pytest.raises(NeedleNotFoundError, match="outside the confirmation CT"):
        detect_needle(body_ct, [900.0, 0, 0], [1000.0, 0, 0])


def test_cancel_stops_detection(body_ct):
    with pytest.raises(SmartBiopsyError, match="cancelled"):
        detect_needle(body_ct, TARGET - [70.0, 0, 0], TARGET, should_cancel=lambda: True)


def test_placement_error_split_matches_hand_computation():
    entry = np.array([0.0, 0.0, 0.0])
    target = np.array([0.0, 0.0, 100.0])
    err = placement_error(entry, target, [3.0, 4.0, 95.0], axis=[0.0, 0.0, 1.0])
    assert err.depth_error_mm == pytest.approx(-5.0)
    assert err.lateral_error_mm == pytest.approx(5.0)
    assert err.tip_error_mm == pytest.approx(np.sqrt(50.0))
    assert err.angle_deg == pytest.approx(0.0)
    err = placement_error(entry, target, target, axis=[1.0, 0.0, 1.0])
    assert err.angle_deg == pytest.approx(45.0)


def test_phantom_needle_to_habitat_a(phantom0):
    """Digital phantom: needle inserted along a known oblique path into habitat A."""
    case = phantom0
    target, entry = _phantom_path(case, habitat=1, direction=[0.35, 1.0, 0.25], depth_mm=90.0)
    sim = simulate_confirmation_ct(case.ct, entry, target, "17G/18G-20mm", lateral_error_mm=1.5,
                                   depth_error_mm=2.0, seed=4)
    det = detect_needle(sim.ct, entry, target, needle="17G/18G-20mm", target_name="A")
    assert np.linalg.norm(det.tip_ras - sim.truth.tip_ras) <= 1.0
    assert _angle_deg(det.axis, sim.truth.axis) <= 2.0
    assert det.lateral_error_mm == pytest.approx(1.5, abs=1.0)
    assert det.depth_error_mm == pytest.approx(2.0, abs=1.0)


def _phantom_path(case, habitat, direction, depth_mm):
    """Deepest CT point of a habitat as target, entry ``depth_mm`` back along ``direction`` (RAS)."""
    from scipy import ndimage

    mask = case.ct_habitats.array == habitat
    dist = ndimage.distance_transform_edt(mask, sampling=case.ct.spacing[::-1])
    target = case.ct.kji_to_ras_points(np.array([np.unravel_index(np.argmax(dist), dist.shape)]))[0]
    d = _unit(direction)
    return target, target + depth_mm * d


def test_tube_voxels_match_brute_force_on_an_oblique_grid():
    from SmartBiopsyLib.sampling.needle import _tube_voxels

    rot = np.array([[0.96, -0.2, 0.19], [0.22, 0.97, -0.05], [-0.17, 0.09, 0.98]])
    u, _, vt = np.linalg.svd(rot)
    direction = u @ vt  # orthonormal, a tilted gantry-like grid
    ct = RasVolume(np.zeros((30, 40, 50), np.int16), make_grid([-20.0, -15.0, -25.0], [0.8, 0.9, 1.5], (30, 40, 50),
                                                                direction), "ct")
    p0, p1 = np.array([-10.0, 5.0, -8.0]), np.array([12.0, -6.0, 10.0])
    got = {tuple(x) for x in _tube_voxels(ct, p0, p1, 3.0)}
    kji = np.argwhere(np.ones(ct.array.shape, bool))
    pts = ct.kji_to_ras_points(kji)
    d = (p1 - p0) / np.linalg.norm(p1 - p0)
    t = np.clip((pts - p0) @ d, 0, np.linalg.norm(p1 - p0))
    inside = np.linalg.norm(pts - p0 - np.outer(t, d), axis=1) <= 3.0
    assert got == {tuple(x) for x in kji[inside]}


def test_detects_needle_in_tilted_ct_grid(body_ct):
    theta = np.radians(12.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
    ct = RasVolume(body_ct.array, make_grid([-80.0, -80.0, -80.0], [1.0, 1.0, 2.0], body_ct.array.shape, tilt), "tilted")
    d = _unit([0.5, 1.0, 0.2])
    entry = TARGET - 70.0 * d
    sim = simulate_confirmation_ct(ct, entry, TARGET, lateral_error_mm=1.0, seed=8)
    det = detect_needle(sim.ct, entry, TARGET)
    assert np.linalg.norm(det.tip_ras - sim.truth.tip_ras) <= 1.0
    assert _angle_deg(det.axis, sim.truth.axis) <= 2.0

"""Notch ROI geometry and partial-volume-aware sampling of maps on their own grids."""
from __future__ import annotations

import json

import numpy as np
import pytest

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyLib.sampling.notch import (NotchROI, notch_roi, roi_fractions, sample_map, sample_maps, validate_transform,
                                  weighted_median)


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _rotation(axis, deg):
    a = _unit(axis)
    t = np.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


# ---------------------------------------------------------------------------------------------- geometry
def test_side_notch_box_follows_needle_model_geometry():
    tip = np.array([10.0, -5.0, 30.0])
    axis = _unit([0.3, -1.0, 0.2])
    roi = notch_roi(tip, axis, "side-notch", "17G/18G-20mm", target_name="A")
    # catalogue: 18 G core (1.27 mm), 20 mm notch ending 5 mm before the tip
    assert roi.shape == "box"
    np.testing.assert_allclose(roi.end_ras, tip - 5.0 * axis, atol=1e-9)
    np.testing.assert_allclose(roi.start_ras, tip - 25.0 * axis, atol=1e-9)
    assert roi.half_widths_mm == pytest.approx((0.635, 0.635))
    assert roi.volume_mm3 == pytest.approx(1.27 * 1.27 * 20.0)
    corners = roi.corners_ras()
    # the eight corners span exactly the box in the ROI frame
    loc = roi.local(corners)
    np.testing.assert_allclose(np.sort(np.unique(np.round(loc[:, 2], 9))), [0.0, 20.0], atol=1e-9)
    np.testing.assert_allclose(np.abs(loc[:, :2]), 0.635, atol=1e-9)
    assert abs(roi.u_axis @ axis) < 1e-12 and abs(roi.v_axis @ roi.u_axis) < 1e-12
    json.dumps(roi.to_dict())


def test_tip_distal_region_is_20_by_2_mm_cylinder_beyond_tip():
    tip = np.array([0.0, 0.0, 0.0])
    axis = _unit([1.0, 1.0, 1.0])
    roi = notch_roi(tip, axis, "tip-distal")
    assert roi.shape == "cylinder"
    np.testing.assert_allclose(roi.start_ras, tip)
    np.testing.assert_allclose(roi.end_ras, 20.0 * axis, atol=1e-9)
    assert roi.radius_mm == pytest.approx(1.0)
    assert roi.volume_mm3 == pytest.approx(np.pi * 20.0)
    inside = roi.contains(np.array([tip + 10 * axis, tip + 10 * axis + 0.99 * roi.u_axis]))
    outside = roi.contains(np.array([tip - 0.1 * axis, tip + 10 * axis + 1.01 * roi.v_axis, tip + 20.1 * axis]))
    assert inside.all() and not outside.any()


def test_side_notch_without_notch_geometry_is_refused():
    with pytest.raises(InputDataError, match="notch length"):
        notch_roi([0, 0, 0], [0, 0, 1], "side-notch", core_diameter_mm=1.2)


def test_unknown_mode_and_zero_axis_are_refused():
    with pytest.raises(InputDataError, match="unknown"):
        notch_roi([0, 0, 0], [0, 0, 1], "sideways")
    with pytest.raises(InputDataError, match="zero length"):
        notch_roi([0, 0, 0], [0, 0, 0], "tip-distal")


# ---------------------------------------------------------------------------------------------- statistics
def test_weighted_median_matches_numpy_for_equal_and_integer_weights():
    rng = np.random.default_rng(3)
    for n in (7, 8):
        v = rng.normal(size=n)
        assert weighted_median(v, np.ones(n)) == pytest.approx(np.median(v))
    v = rng.normal(size=9)
    w = rng.integers(1, 5, size=9)
    assert weighted_median(v, w.astype(float)) == pytest.approx(np.median(np.repeat(v, w)))


def _half_space_map(spacing=(1.5, 1.5, 3.0), shape=(20, 40, 40), boundary_i=20, a=800.0, b=1800.0, direction=None):
    origin = np.array([-30.0, -30.0, -30.0])
    m = make_grid(origin, spacing, shape, direction)
    arr = np.full(shape, a, np.float32)
    arr[:, :, boundary_i:] = b
    vol = RasVolume(arr, m, "adc")
    # boundary plane: the face between voxel i = boundary_i - 1 and boundary_i
    p_plane = vol.ijk_to_ras_points([[boundary_i - 0.5, shape[1] / 2, shape[0] / 2]])[0]
    n_plane = vol.direction_ras[:, 0]
    return vol, p_plane, n_plane


@pytest.mark.parametrize("mode", ["tip-distal", "side-notch"])
@pytest.mark.parametrize("axis", [(1.0, 0.35, 0.2), (0.8, -0.5, 0.45)])
def test_partial_volume_weights_reproduce_analytic_half_space_answer(mode, axis):
    """A region cut by a plane through its side wall: the exact mean is (a s0 + b (L - s0)) / L."""
    vol, p_plane, n_plane = _half_space_map()
    a_val, b_val = 800.0, 1800.0
    ax = _unit(axis)
    length = 20.0
    s0 = 8.3  # where the axis crosses the boundary plane, from the ROI start
    shift = np.array([0.0, 2.3, -1.7])
    shift -= (shift @ n_plane) * n_plane  # move within the boundary plane only
    start = p_plane + shift - s0 * ax  # the axis crosses the plane s0 mm after the start
    if mode == "tip-distal":
        roi = notch_roi(start, ax, "tip-distal", tip_distal_length_mm=length, tip_distal_diameter_mm=2.0)
    else:
        roi = notch_roi(start + (length + 3.0) * ax, ax, "side-notch", notch_length_mm=length, notch_offset_mm=3.0,
                        core_diameter_mm=2.0)
    assert abs((roi.start_ras + s0 * roi.axis - p_plane) @ n_plane) < 1e-9
    expected = (a_val * s0 + b_val * (length - s0)) / length
    st = sample_map(roi, vol, supersample=8)
    # tolerance: 0.5 % of the step between the two values
    assert abs(st.mean - expected) <= 0.005 * (b_val - a_val), (st.mean, expected)
    assert st.volume_mm3 == pytest.approx(roi.volume_mm3, rel=0.01)
    assert st.coverage == pytest.approx(1.0, abs=0.01)
    # median: more of the region (11.7 of 20 mm) is on the b side
    assert st.median == b_val
    assert st.min == a_val and st.max == b_val
    # weighted SD of a two-valued distribution: |b - a| sqrt(p (1 - p))
    p = s0 / length
    assert st.sd == pytest.approx((b_val - a_val) * np.sqrt(p * (1 - p)), rel=0.02)
    assert st.voxels_touched > st.voxels_effective > 0


def test_roi_is_carried_through_rotated_mri_grid_and_transform():
    """Map on an oblique MRI grid in another pose: only the true MRI->CT matrix lands the ROI in the right place."""
    rot = _rotation([0.2, 1.0, 0.3], 25.0)
    mri_to_ct = np.eye(4)
    mri_to_ct[:3, :3] = rot
    mri_to_ct[:3, 3] = [60.0, -70.0, 30.0]
    grid_dir = _rotation([1.0, 0.0, 0.2], 15.0)
    shape = (16, 60, 60)
    m = make_grid([-45.0, -45.0, -40.0], (1.5, 1.5, 5.0), shape, grid_dir)
    # map value = 1000 + 10 * (x coordinate in MRI world), a linear field: the exact ROI mean is the value
    # at the ROI centroid (mapped to MRI world)
    base = RasVolume(np.zeros(shape, np.float32), m, "adc")
    kji = np.argwhere(np.ones(shape, bool))
    ras = base.kji_to_ras_points(kji)
    arr = (1000.0 + 10.0 * ras[:, 0]).reshape(shape).astype(np.float32)
    adc = base.with_array(arr)
    ct_centre = mri_to_ct[:3, :3] @ np.array([3.0, 4.0, -2.0]) + mri_to_ct[:3, 3]
    ax = _unit([0.4, 0.2, 1.0])
    roi = notch_roi(ct_centre - 10 * ax, ax, "tip-distal", target_name="A")
    vals = sample_maps(roi, {"adc": adc}, mri_to_ct, supersample=6)
    centre_mri = np.linalg.inv(mri_to_ct) @ np.append(ct_centre, 1.0)
    expected = 1000.0 + 10.0 * centre_mri[0]
    assert vals.maps["adc"].mean == pytest.approx(expected, abs=1.5)
    json.dumps(vals.to_dict())
    # the inverted transform (CT->MRI given instead of MRI->CT) puts the ROI somewhere else or outside
    with pytest.raises(InputDataError, match="outside map 'adc'"):
        sample_maps(roi, {"adc": adc}, np.linalg.inv(mri_to_ct))


@pytest.mark.parametrize("bad,match", [
    (np.full((4, 4), np.nan), "NaN"),
    (np.eye(3), "4x4"),
    (np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.diag([1.0, 1.0, -1.0, 1.0]), "mirrors"),
    (np.diag([10.0, 10.0, 10.0, 1.0]), "scales"),
    (np.zeros((4, 4)), "affine"),
    ("not a matrix", "4x4"),
])
def test_invalid_transforms_are_refused(bad, match):
    with pytest.raises(InputDataError, match=match):
        validate_transform(bad)


def test_roi_outside_map_is_refused_with_the_transform_hint():
    vol, _, _ = _half_space_map()
    roi = notch_roi([500.0, 0.0, 0.0], [1.0, 0.0, 0.0], "tip-distal", target_name="B")
    with pytest.raises(InputDataError, match="target B.*outside map"):
        sample_maps(roi, {"adc": vol}, np.eye(4))


def test_adc_in_wrong_units_is_refused():
    vol, p, _ = _half_space_map(a=0.0008, b=0.0018)
    roi = notch_roi(p, [1.0, 0.2, 0.1], "tip-distal")
    with pytest.raises(InputDataError, match="1e-6 mm"):
        sample_maps(roi, {"adc": vol})


def test_nan_voxels_are_left_out_with_a_warning():
    vol, p, _ = _half_space_map(a=50.0, b=50.0)
    roi = notch_roi(p, [1.0, 0.2, 0.1], "tip-distal")
    kji, w = roi_fractions(roi, vol)
    arr = vol.array.copy()
    arr[tuple(kji[np.argmax(w)])] = np.nan
    res = sample_maps(roi, {"ff": vol.with_array(arr, name="ff")})
    assert res.maps["ff"].mean == pytest.approx(50.0)
    assert res.maps["ff"].n_nan == 1 and any("NaN" in w for w in res.warnings)


def test_empty_map_set_is_refused():
    roi = notch_roi([0, 0, 0], [1.0, 0, 0], "tip-distal")
    with pytest.raises(InputDataError, match="no parameter maps"):
        sample_maps(roi, {})


def test_notch_roi_dataclass_round_trip_fields():
    roi = NotchROI(mode="tip-distal", shape="cylinder", start_ras=np.zeros(3), axis=np.array([0, 0, 1.0]),
                   length_mm=20.0, u_axis=np.array([1.0, 0, 0]), v_axis=np.array([0, 1.0, 0]), radius_mm=1.0)
    d = roi.to_dict()
    assert d["end_ras"] == [0.0, 0.0, 20.0] and d["radius_mm"] == 1.0 and len(d["corners_ras"]) == 8


# ---------------------------------------------------------------------------------------------- phantom
@pytest.mark.parametrize("habitat,tissue", [(1, "tumour_cellular"), (3, "tumour_myxoid")])
@pytest.mark.parametrize("mode", ["tip-distal", "side-notch"])
def test_phantom_notch_values_equal_true_habitat_values(phantom0, habitat, tissue, mode):
    """Needle simulated into the phantom CT, detected, notch ROI sampled on the truth maps (MRI grid) through
    the true MRI->CT transform: mean ADC/FF/EF within 3 % of the habitat's true values at that site.

    The phantom's ADC and EF carry a smooth multiplicative texture (about +-8 %) inside the tumour, so the
    true value at the site is the habitat's nominal value times the texture averaged over the true ROI,
    computed on dense points in CT world (independent of any map grid)."""
    from scipy import ndimage

    from SmartBiopsyLib.sampling.needle import detect_needle
    from SmartBiopsyLib.sampling.needle_sim import simulate_confirmation_ct
    from SmartBiopsyLib.sampling.notch import notch_roi_from_detection

    case = phantom0
    mask = case.ct_habitats.array == habitat
    dist = ndimage.distance_transform_edt(mask, sampling=case.ct.spacing[::-1])
    deepest = case.ct.kji_to_ras_points(np.array([np.unravel_index(np.argmax(dist), dist.shape)]))[0]
    d = _unit([-0.3, -1.0, 0.2])  # insertion direction: anterior-to-posterior, oblique
    needle = "17G/18G-10mm"  # 10 mm notch ending 5 mm before the tip
    # place the needle so that the ROI's centre sits at the habitat's deepest point
    target = deepest - 10.0 * d if mode == "tip-distal" else deepest + 10.0 * d
    entry = target - 90.0 * d
    sim = simulate_confirmation_ct(case.ct, entry, target, needle, seed=habitat)
    det = detect_needle(sim.ct, entry, target, needle=needle, target_name="A")
    roi = notch_roi_from_detection(det, mode, needle)
    maps = {"adc": case.truth.adc, "ff": case.truth.ff, "ef": case.truth.ef}
    vals = sample_maps(roi, maps, case.truth.mri_to_ct)
    nominal = case.truth.habitat_values[tissue]
    true_roi = notch_roi(sim.truth.tip_ras, sim.truth.axis, mode, needle)
    g = np.linspace(-1, 1, 9)
    loc = np.stack(np.meshgrid(g, g, np.linspace(0, 1, 41), indexing="ij"), -1).reshape(-1, 3)
    hu_, hv_ = true_roi.half_extent_mm
    pts = (true_roi.start_ras + np.outer(loc[:, 2] * true_roi.length_mm, true_roi.axis)
           + np.outer(loc[:, 0] * hu_, true_roi.u_axis) + np.outer(loc[:, 1] * hv_, true_roi.v_axis))
    pts = pts[true_roi.contains(pts)]
    texture = {"adc": case.anatomy.texture_factor(0, pts).mean(), "ef": case.anatomy.texture_factor(1, pts).mean(),
               "ff": 1.0}
    for key in ("adc", "ff", "ef"):
        st = vals.maps[key]
        expected = nominal[key] * texture[key]
        assert st.mean == pytest.approx(expected, rel=0.03), (key, st.mean, expected)
        assert st.coverage == pytest.approx(1.0, abs=0.02)
        assert st.volume_mm3 == pytest.approx(roi.volume_mm3, rel=0.02)
    json.dumps(vals.to_dict())

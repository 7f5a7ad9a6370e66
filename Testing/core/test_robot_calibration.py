"""Robot-to-CT calibration from the fiducial frame in the CT (TrajectoryPlannerLib.calibration).

Simulated CTs (SmartBiopsyCoreLib.phantom.robot_frame.calibration_ct) with the frame at a seeded pose near the
patient; measured pose errors on seeds 0-7 were <= 0.03 mm and <= 0.04 deg (0.6-3 mm slices), per-tube
residuals <= 0.18 mm: the tolerances below are a few times those.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.fiducial_frames.model import load_model, parse_model
from SmartBiopsyCoreLib.phantom.robot_frame import calibration_ct, render_frame
from TrajectoryPlannerLib.calibration.frame_fit import (CalibrationError, CalibrationThresholds, calibrate_from_ct,
                                                        model_symmetries)

POSE_MM, POSE_DEG = 0.15, 0.15
TARGET = {"T": [0.0, 0.0, 0.0]}


def _pose_error(result, truth, model):
    m = result.matrix_robot_to_ct_ras
    c = model.centre
    dt = float(np.linalg.norm(m[:3, :3] @ c + m[:3, 3] - (truth[:3, :3] @ c + truth[:3, 3])))
    dr = float(np.degrees(Rotation.from_matrix(m[:3, :3] @ truth[:3, :3].T).magnitude()))
    return dt, dr


@pytest.fixture(scope="module")
def zframe():
    return load_model("zframe-7tube")


@pytest.fixture(scope="module")
def spheres():
    return load_model("spheres-6")


@pytest.mark.parametrize("seed,slice_mm", [(0, 0.6), (1, 1.0), (2, 2.0), (3, 3.0)])
def test_zframe_pose_recovered_for_thin_and_thick_slices(zframe, seed, slice_mm):
    ct, truth = calibration_ct(seed, zframe, pixel_mm=1.0, slice_mm=slice_mm)
    res = calibrate_from_ct(ct, zframe, TARGET)
    dt, dr = _pose_error(res, truth, zframe)
    assert dt <= POSE_MM and dr <= POSE_DEG, (dt, dr)
    assert res.passed, res.checks
    assert len(res.residuals_mm) == 7 and max(res.residuals_mm.values()) <= 0.5
    # the predicted error at the target covers the true error there
    true_err = float(np.linalg.norm((res.matrix_robot_to_ct_ras - truth)[:3, :3] @ np.linalg.inv(truth)[:3, :3]
                                    @ (np.zeros(3) - truth[:3, 3]) + (res.matrix_robot_to_ct_ras - truth)[:3, 3]))
    assert res.target_errors["T"] >= true_err


def test_sphere_frame_pose_recovered(spheres):
    ct, truth = calibration_ct(4, spheres, pixel_mm=1.0, slice_mm=2.0)
    res = calibrate_from_ct(ct, spheres, TARGET)
    dt, dr = _pose_error(res, truth, spheres)
    assert dt <= POSE_MM and dr <= 0.3, (dt, dr)
    assert res.passed and len(res.residuals_mm) == 6


def test_noise_and_metal_streaks_near_the_frame_do_not_move_the_pose(zframe):
    ct, truth = calibration_ct(5, zframe, pixel_mm=1.0, slice_mm=1.5, noise_hu=40.0, streaks=True)
    res = calibrate_from_ct(ct, zframe, TARGET)
    dt, dr = _pose_error(res, truth, zframe)
    assert dt <= 2 * POSE_MM and dr <= 2 * POSE_DEG, (dt, dr)
    assert res.passed


def test_frame_partly_out_of_the_scan_is_refused(zframe):
    ct, _ = calibration_ct(6, zframe, pixel_mm=1.0, slice_mm=2.0, fov_cut_mm=35.0)
    with pytest.raises(CalibrationError, match="partial|whole frame"):
        calibrate_from_ct(ct, zframe, TARGET)


def test_frame_slightly_cut_by_the_scan_edge_still_fits(zframe):
    ct, truth = calibration_ct(7, zframe, pixel_mm=1.0, slice_mm=2.0, fov_cut_mm=6.0)
    res = calibrate_from_ct(ct, zframe, TARGET)
    dt, dr = _pose_error(res, truth, zframe)
    assert dt <= POSE_MM and dr <= POSE_DEG, (dt, dr)


def test_no_frame_in_the_scan_is_refused(zframe):
    ct, _ = calibration_ct(1, zframe, pixel_mm=1.0, slice_mm=2.0)
    plain = ct.with_array(np.minimum(ct.array, 300).astype(np.int16))  # the frame's tubes fade to 300 HU
    with pytest.raises(CalibrationError, match="no zframe-7tube frame found"):
        calibrate_from_ct(plain, zframe, TARGET)


def test_only_parallel_tubes_visible_is_refused(zframe):
    ct, truth = calibration_ct(2, zframe, pixel_mm=1.0, slice_mm=2.0)
    d = zframe.to_dict()
    edges = [tb for tb in d["tubes"] if tb["name"].startswith("E")]
    # erase the frame from the scan, then draw its four parallel edge tubes only
    corners = np.array([tb[k] for tb in d["tubes"] for k in ("start", "end")]) @ truth[:3, :3].T + truth[:3, 3]
    ijk = ct.ras_to_ijk_points(np.vstack([corners.min(0) - 8, corners.max(0) + 8]))
    lo, hi = np.floor(ijk.min(0)).astype(int), np.ceil(ijk.max(0)).astype(int) + 1
    hu = ct.array.astype(np.float32)
    hu[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = -1000.0
    # (the X tube only makes the drawing model valid: four parallel tubes alone are refused; it lies far outside)
    far = {"name": "X", "start": [9e3, 0, 0], "end": [9e3, 40, 0], "radius_mm": 2.0}
    render_frame(hu, ct, parse_model({**d, "tubes": edges + [far]}), truth)
    scan = ct.with_array(np.round(hu).astype(np.int16))
    with pytest.raises(CalibrationError, match="all parallel"):
        calibrate_from_ct(scan, zframe, TARGET)


def test_symmetric_frame_model_is_refused_before_fitting(zframe):
    d = zframe.to_dict()
    d["tubes"][5]["start"], d["tubes"][5]["end"] = [-30.0, 30.0, 30.0], [-30.0, -30.0, -30.0]  # the symmetric layout
    sym = parse_model(d)
    assert model_symmetries(sym) and not model_symmetries(zframe)
    ct, _ = calibration_ct(0, sym, pixel_mm=1.0, slice_mm=2.0)
    with pytest.raises(CalibrationError, match="symmetric"):
        calibrate_from_ct(ct, sym, TARGET)


def test_qa_fails_and_names_the_check_when_residuals_exceed_the_limit(zframe):
    ct, _ = calibration_ct(3, zframe, pixel_mm=1.0, slice_mm=3.0)
    res = calibrate_from_ct(ct, zframe, TARGET, CalibrationThresholds(max_residual_mm=0.005))
    assert res.passed is False and res.checks["residual"]["passed"] is False
    assert res.to_dict()["qa"]["passed"] is False


def test_qa_fails_without_a_target_to_check(zframe):
    ct, _ = calibration_ct(1, zframe, pixel_mm=1.0, slice_mm=2.0)
    res = calibrate_from_ct(ct, zframe, {})
    assert res.passed is False and "no target" in res.checks["target_error"]["reason"]


@pytest.mark.parametrize("change,fragment", [
    ({"extra": 1}, "unknown keys extra"),
    ({"frame": "CT"}, "ROBOT frame"),
    ({"schema": "zframe"}, "schema"),
    ({"tubes": []}, "either tubes or spheres"),
    ({"ct_intensity_hu": {"min": 900, "max": 800, "nominal": 850}}, "min < nominal < max"),
])
def test_frame_model_schema_refusals(zframe, change, fragment):
    with pytest.raises(InputDataError, match=fragment):
        parse_model({**zframe.to_dict(), **change})


def test_frame_model_refuses_a_negative_radius_and_collinear_spheres(spheres):
    d = spheres.to_dict()
    d["spheres"][0]["radius_mm"] = -1
    with pytest.raises(InputDataError, match="positive"):
        parse_model(d)
    d = spheres.to_dict()
    for i, s in enumerate(d["spheres"]):
        s["centre"] = [10.0 * i, 0.0, 0.0]
    with pytest.raises(InputDataError, match="one line"):
        parse_model(d)


def test_calibration_document_is_strict_json_with_the_agreed_keys(zframe):
    ct, _ = calibration_ct(2, zframe, pixel_mm=1.0, slice_mm=2.0)
    doc = calibrate_from_ct(ct, zframe, TARGET).to_dict()
    json.dumps(doc, allow_nan=False)
    assert set(doc) == {"schema", "from_frame", "to_frame", "space", "units", "matrix_robot_to_ct_ras", "qa", "source"}
    assert doc["qa"]["passed"] is True and doc["from_frame"] == "ROBOT" and doc["space"] == "RAS"


def test_two_equally_good_poses_are_refused_even_without_the_model_check(zframe, monkeypatch):
    """The fit itself notices a frame that two poses explain (here the symmetric layout, model check bypassed)."""
    import TrajectoryPlannerLib.calibration.frame_fit as ff

    d = zframe.to_dict()
    d["tubes"][5]["start"], d["tubes"][5]["end"] = [-30.0, 30.0, 30.0], [-30.0, -30.0, -30.0]
    sym = parse_model(d)
    monkeypatch.setattr(ff, "model_symmetries", lambda model, tol_mm=1.0: [])
    ct, _ = calibration_ct(0, sym, pixel_mm=1.0, slice_mm=2.0)
    with pytest.raises(CalibrationError, match="two different poses"):
        ff.calibrate_from_ct(ct, sym, TARGET)


def test_a_tube_missing_from_the_scan_is_refused_by_name(zframe):
    """Six of seven tubes fit a pose well; the seventh's absence must still stop the calibration."""
    ct, truth = calibration_ct(4, zframe, pixel_mm=1.0, slice_mm=2.0)
    d = zframe.to_dict()
    # erase the frame, then draw it again without E1
    corners = np.array([tb[k] for tb in d["tubes"] for k in ("start", "end")]) @ truth[:3, :3].T + truth[:3, 3]
    ijk = ct.ras_to_ijk_points(np.vstack([corners.min(0) - 8, corners.max(0) + 8]))
    lo, hi = np.floor(ijk.min(0)).astype(int), np.ceil(ijk.max(0)).astype(int) + 1
    hu = ct.array.astype(np.float32)
    hu[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = -1000.0
    render_frame(hu, ct, parse_model({**d, "tubes": [tb for tb in d["tubes"] if tb["name"] != "E1"]}), truth)
    with pytest.raises(CalibrationError, match="missing E1"):
        calibrate_from_ct(ct.with_array(np.round(hu).astype(np.int16)), zframe, TARGET)

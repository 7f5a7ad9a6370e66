"""Robot calibration file, strict registration QA gate, rigid-geometry check and planner plan selection."""
from __future__ import annotations

import json

import numpy as np
import pytest

from TrajectoryPlannerLib.errors import RobotBridgeError
from TrajectoryPlannerLib.robot.calibration_io import (load_robot_calibration, rigid_problem,
                                                       write_robot_calibration)
from TrajectoryPlannerLib.robot.protocol import RobotPlan, registration_qa_problem, select_trajectories


def _rigid(deg=20.0, t=(10.0, -20.0, 30.0)):
    a = np.radians(deg)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    m[:3, 3] = t
    return m


def _doc(**over):
    doc = {"schema": "smartbiopsy.robot_calibration/1", "from_frame": "ROBOT", "to_frame": "CT", "space": "RAS",
           "units": "mm", "matrix_robot_to_ct_ras": _rigid().tolist(), "qa": {"passed": True, "fre_mm": 0.4},
           "source": "fiducial frame registration"}
    doc.update(over)
    return doc


def _write(tmp_path, doc, raw=None):
    p = tmp_path / "robot_calibration.json"
    p.write_text(raw if raw is not None else json.dumps(doc))
    return p


def test_valid_calibration_file_is_read_with_its_matrix(tmp_path):
    cal = load_robot_calibration(_write(tmp_path, _doc()))
    np.testing.assert_allclose(cal.matrix_robot_to_ct_ras, _rigid())
    assert cal.qa["passed"] is True and cal.source == "fiducial frame registration"
    p = tmp_path / "again.json"
    write_robot_calibration(p, cal.matrix_robot_to_ct_ras, cal.qa, cal.source)
    np.testing.assert_allclose(load_robot_calibration(p).matrix_robot_to_ct_ras, _rigid())


def _scaled():
    m = _rigid()
    m[:3, :3] *= 1000.0
    return m.tolist()


def _sheared():
    m = _rigid()
    m[0, 1] += 0.2
    return m.tolist()


def _mirrored():
    m = _rigid()
    m[:3, 0] *= -1
    return m.tolist()


@pytest.mark.parametrize("over, message", [
    ({"extra": 1}, "unknown keys extra"),
    ({"matrix_robot_to_ct_ras": _scaled()}, "not orthonormal"),
    ({"matrix_robot_to_ct_ras": _sheared()}, "not orthonormal"),
    ({"matrix_robot_to_ct_ras": _mirrored()}, "determinant"),
    ({"matrix_robot_to_ct_ras": np.zeros((4, 4)).tolist()}, "not affine"),
    ({"matrix_robot_to_ct_ras": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}, "4x4 list"),
    ({"matrix_robot_to_ct_ras": [[True, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}, "4x4 list"),
    ({"qa": {"passed": "true"}}, "QA did not pass"),
    ({"qa": {"passed": 1}}, "QA did not pass"),
    ({"qa": {"passed": [True]}}, "QA did not pass"),
    ({"qa": {"fre_mm": 0.3}}, "QA did not pass"),
    ({"qa": True}, "QA did not pass"),
    ({"from_frame": "CT", "to_frame": "ROBOT"}, "from_frame"),
    ({"space": "LPS"}, "space"),
    ({"units": "m"}, "units"),
    ({"source": ""}, "source"),
])
def test_bad_calibration_files_are_refused_with_a_sentence(tmp_path, over, message):
    with pytest.raises(RobotBridgeError, match=message):
        load_robot_calibration(_write(tmp_path, _doc(**over)))


def test_missing_key_and_non_finite_values_are_refused(tmp_path):
    doc = _doc()
    del doc["qa"]
    with pytest.raises(RobotBridgeError, match="lacks qa"):
        load_robot_calibration(_write(tmp_path, doc))
    raw = json.dumps(_doc()).replace("10.0", "NaN", 1)
    with pytest.raises(RobotBridgeError, match="not valid JSON|NaN"):
        load_robot_calibration(_write(tmp_path, None, raw))
    with pytest.raises(RobotBridgeError, match="does not exist"):
        load_robot_calibration(tmp_path / "nope.json")


def test_rigid_problem_accepts_rotations_and_refuses_zero_or_scaled_rotations():
    assert rigid_problem(_rigid()) is None
    zero = _rigid()
    zero[:3, :3] = 0
    assert "not orthonormal" in rigid_problem(zero)
    nearly = _rigid()
    nearly[:3, :3] *= 1.0 + 4e-4            # within 1e-3: float32 round trips must pass
    assert rigid_problem(nearly) is None
    off = _rigid()
    off[:3, :3] *= 1.002
    assert "not orthonormal" in rigid_problem(off)
    inf = _rigid()
    inf[0, 3] = np.inf
    assert "NaN or infinite" in rigid_problem(inf)


# ------------------------------------------------------------------------------------------ QA gate
QA_OK = {"passed": True, "failures": [], "thresholds": {"max_predicted_tre_mm": 2.0},
         "targets": [{"name": "A", "predicted_tre_mm": 1.1}, {"name": "B", "predicted_tre_mm": 1.9}]}


def test_qa_gate_passes_only_a_json_true_with_every_target_within_threshold():
    assert registration_qa_problem(QA_OK, ["A", "B"]) is None


@pytest.mark.parametrize("passed", ["false", "no", "true", [False], [True], 1, 0, None, "yes"])
def test_qa_gate_refuses_anything_but_json_true(passed):
    problem = registration_qa_problem({**QA_OK, "passed": passed}, ["A", "B"])
    assert problem and "did not pass" in problem


@pytest.mark.parametrize("qa, target_names, message", [
    ({**QA_OK, "targets": [{"name": "A", "predicted_tre_mm": 25.0}]}, ["A"], "25.0 mm, over its 2 mm threshold"),
    ({**QA_OK, "targets": [{"name": "A", "predicted_tre_mm": 2.5, "max_predicted_tre_mm": 2.4}]}, ["A"], "over its"),
    ({**QA_OK, "targets": []}, ["A"], "no predicted error"),
    ({"passed": True}, ["A"], "no predicted error"),
    (QA_OK, ["A", "C"], "no predicted error at target C"),
    ({**QA_OK, "thresholds": {}}, ["A"], "no valid threshold"),
    ({**QA_OK, "targets": [{"name": "A", "predicted_tre_mm": "1"}]}, ["A"], "no valid predicted error"),
    ({**QA_OK, "targets": [{"name": "A", "predicted_tre_mm": float("nan")}]}, ["A"], "no valid predicted error"),
    ({**QA_OK, "failures": ["FRE 3 mm > 2 mm"]}, ["A"], "lists failures"),
    ({}, ["A"], "no registration QA"),
    ("passed", ["A"], "no registration QA"),
])
def test_qa_gate_refuses_predicted_errors_over_threshold_or_missing(qa, target_names, message):
    problem = registration_qa_problem(qa, target_names)
    assert problem and message in problem, problem


# ------------------------------------------------------------------------------------ plan selection
def _planner_plan(n_targets=3, per_target=5):
    trajs = []
    for k, name in enumerate("ABCD"[:n_targets]):
        for r in range(1, per_target + 1):
            trajs.append({"name": f"{name}-{r}", "target": name, "region": name, "rank": r,
                          "entry_ras": [10.0 * k + r, 60.0, 90.0], "target_ras": [10.0 * k, 15.0, 40.0]})
    return {"trajectories": trajs, "shared_entry": None, "needle": {"core": {"usable_length_mm": 150.0}},
            "registration_qa": {**QA_OK, "targets": [{"name": n, "predicted_tre_mm": 1.0} for n in "ABCD"]}}


def test_planner_plan_sends_the_best_ranked_path_per_target_by_default():
    plan = RobotPlan.from_dict(_planner_plan())
    assert [t.name for t in plan.targets] == ["A-1", "B-1", "C-1"]
    assert [t.target for t in plan.targets] == ["A", "B", "C"]
    assert plan.registration_qa_passed and plan.needle_length_mm == 150.0
    assert plan.calibration_matrix is None and plan.robot_frame == ""          # no default calibration


def test_paths_option_chooses_paths_and_bad_choices_list_the_alternatives():
    plan = RobotPlan.from_dict(_planner_plan(), paths=["A-2", "B-5", "C-1"])
    assert [t.name for t in plan.targets] == ["A-2", "B-5", "C-1"]
    with pytest.raises(RobotBridgeError, match=r"Path A-9 is not in the plan; choose from A-1 \(target A, rank 1\)"):
        RobotPlan.from_dict(_planner_plan(), paths=["A-9"])
    with pytest.raises(RobotBridgeError, match="More than one path was chosen for target A"):
        RobotPlan.from_dict(_planner_plan(), paths=["A-1", "A-2"])


def test_too_many_targets_or_tied_ranks_are_refused_with_the_choices():
    with pytest.raises(RobotBridgeError, match=r"4 targets; a robot session takes 1 to 3: choose the paths with "
                                               r"--paths from A-1 \(target A, rank 1\)"):
        RobotPlan.from_dict(_planner_plan(n_targets=4))
    tied = _planner_plan()
    tied["trajectories"][1]["rank"] = 1
    with pytest.raises(RobotBridgeError, match="several paths for target A without one best rank; choose one with "
                                               "--paths from A-1"):
        select_trajectories(tied)


def test_plan_calibration_matrix_key_is_refused_not_trusted():
    with pytest.raises(RobotBridgeError, match="calibration_matrix"):
        RobotPlan.from_dict({**_planner_plan(), "calibration_matrix": np.eye(4).tolist()})


def test_robot_frame_ct_statement_is_the_only_way_to_an_identity_calibration():
    plan = RobotPlan.from_dict(_planner_plan())
    with pytest.raises(RobotBridgeError, match="who states"):
        plan.state_robot_frame_ct("")
    plan.state_robot_frame_ct("Dr Test")
    np.testing.assert_array_equal(plan.calibration_matrix, np.eye(4))
    assert "stated explicitly by Dr Test" in plan.robot_frame_statement


def test_qa_target_of_another_name_counts_only_at_the_same_point():
    qa = {**QA_OK, "targets": [{"name": "T1", "ras": [10.0, 20.0, 30.0], "predicted_tre_mm": 1.0}]}
    assert registration_qa_problem(qa, ["A"], [[10.5, 20.0, 30.5]]) is None          # register --target T1
    problem = registration_qa_problem(qa, ["A"], [[14.0, 20.0, 30.0]])
    assert problem and "no predicted error at target A" in problem

"""The TrajectoryPlanner panel's robot actions through its logic (headless, real MRML scene, loopback
simulator): calibration from the CT, no targeting without a calibration or an explicit statement, STOP on
module exit / scene close."""
from __future__ import annotations

import time

import numpy as np
import pytest

from SmartBiopsyCoreLib.dataio.volumes_mrml import add_volume_node
from SmartBiopsyCoreLib.fiducial_frames.model import load_model
from SmartBiopsyCoreLib.phantom.robot_frame import calibration_ct
from TrajectoryPlannerLib import logic
from TrajectoryPlannerLib.errors import RobotBridgeError
from TrajectoryPlannerLib.planning.engine import PlanResult, Trajectory  # noqa: F401  (types used by robot_plan)
from TrajectoryPlannerLib.robot.simulator import RobotSimulator


@pytest.fixture(scope="module")
def calib_ct():
    model = load_model("zframe-7tube")
    ct, truth = calibration_ct(12, model, pixel_mm=1.2, slice_mm=2.0)
    return ct, truth


def _targets_node(scene, points):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "targets")
    for name, p in points.items():
        node.AddControlPoint([float(v) for v in p], name)
    return node


def test_calibrate_robot_adds_the_fitted_frame_and_checks_the_targets(scene, calib_ct, tmp_path):
    ct, truth = calib_ct
    ct_node = add_volume_node(scene, ct, "CT")
    result, tnode, mnode = logic.calibrate_robot(scene, ct_node, "zframe-7tube", _targets_node(scene, {"A": [0, 0, 0]}),
                                                 out_dir=tmp_path)
    for name in ("calibration.json", "calibration_qa.json", "robot_to_ct.tfm"):
        assert (tmp_path / name).is_file(), name
    assert result.passed and "A" in result.target_errors
    assert mnode.GetParentTransformNode() is tnode
    assert np.linalg.norm(result.matrix_robot_to_ct_ras[:3, 3] - truth[:3, 3]) < 0.5
    text = logic.calibration_text(result)
    assert "QA PASSED" in text and "E1: residual" in text


class _Plan:
    """A planner result with one best path per target (what robot_plan reads)."""

    def __init__(self, targets):
        self.trajectories = [type("T", (), {"target": k, "rank": 1, "region": k, "entry_ras": e, "target_ras": t})()
                             for k, (e, t) in targets.items()]


def _qa_transform(scene):
    import json

    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MRI to CT")
    node.SetAttribute("SmartBiopsy.RegistrationApproved", "true")
    node.SetAttribute("SmartBiopsy.RegistrationQA", json.dumps(
        {"passed": True, "failures": [], "thresholds": {"max_predicted_tre_mm": 3.0},
         "targets": [{"name": "A", "predicted_tre_mm": 0.4, "ras": [-10.0, 15.0, 40.0]}]}))
    return node


def test_connect_refuses_without_calibration_or_statement_before_connecting(scene, tmp_path):
    plan = _Plan({"A": ([-30.0, 60.0, 90.0], [-10.0, 15.0, 40.0])})
    with pytest.raises(RobotBridgeError, match="no robot calibration"):
        logic.connect_robot("127.0.0.1", 1, plan, _qa_transform(scene), tmp_path / "s.jsonl")


def test_connect_refuses_a_calibration_whose_qa_failed(scene, calib_ct, tmp_path):
    from TrajectoryPlannerLib.calibration.frame_fit import CalibrationThresholds, calibrate_from_ct

    ct, _ = calib_ct
    failed = calibrate_from_ct(ct, load_model("zframe-7tube"), {"A": [0, 0, 0]}, CalibrationThresholds(max_residual_mm=1e-4))
    assert failed.passed is False
    plan = _Plan({"A": ([-30.0, 60.0, 90.0], [-10.0, 15.0, 40.0])})
    with pytest.raises(RobotBridgeError):
        logic.connect_robot("127.0.0.1", 1, plan, _qa_transform(scene), tmp_path / "s.jsonl", calibration=failed)


def test_shutdown_sends_stop_when_the_robot_may_be_moving(scene, tmp_path):
    sim = RobotSimulator(0, "127.0.0.1", speed_mm_s=5.0).start()
    try:
        plan = _Plan({"A": ([-30.0, 60.0, 90.0], [-10.0, 15.0, 40.0])})
        s = logic.connect_robot("127.0.0.1", sim.port, plan, _qa_transform(scene), tmp_path / "s.jsonl",
                                robot_frame_ct_by="test operator")
        logic.confirm_plan(s, "test operator")
        s.command("START_UP")
        s.calibrate()
        s.command("PLANNING")
        s.command("TARGETING", confirm=True)
        s.send_target("A", confirm=True)
        from TrajectoryPlannerLib.robot import codec as C
        s.client.send(C.StringMessage(f"CMD_{s._new_id()}", "MOVE_TO_TARGET"))
        end = time.monotonic() + 5
        while not sim.moving and time.monotonic() < end:
            time.sleep(0.01)
        assert sim.moving and s.motion_possible
        assert logic.shutdown_robot(s) is True
        time.sleep(0.1)
    finally:
        sim.stop()
    assert not sim.moving and [p for _, p in sim.commands][-1] == "STOP"
    assert "robot frame = CT RAS, stated explicitly by test operator" in (tmp_path / "s.jsonl").read_text()

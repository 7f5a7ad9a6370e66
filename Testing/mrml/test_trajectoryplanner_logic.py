"""Trajectory Planner panel logic (TrajectoryPlannerLib.logic, what the widget calls) on a real headless scene."""
from types import SimpleNamespace

import numpy as np
import pytest

from SmartBiopsyCoreLib.dataio.volumes_mrml import add_volume_node
from SmartBiopsyCoreLib.phantom import abdomen
from TrajectoryPlannerLib import logic, scenarios
from TrajectoryPlannerLib.errors import TrajectoryPlannerError
from TrajectoryPlannerLib.planning.risk import default_margin


@pytest.fixture(scope="module")
def case():
    return abdomen.make_abdomen(spacing=(3.0, 3.0, 4.0))


def test_hidden_segments_are_exported_under_their_own_name(scene, case):
    ct, labels, _ = case
    ct_node, seg_node = scenarios.risk_segmentation_case(scene, ct, labels, hidden=("aorta",))
    maps = logic.user_labelmaps(scene, seg_node, ct_node)
    assert [names[1] for _, names in maps] == list(abdomen.RISK_LABELS.values())
    lab = np.asarray(labels.array)
    for (vol, names), (value, name) in zip(maps, abdomen.RISK_LABELS.items()):
        assert vol.same_grid(ct)
        inside = np.asarray(vol.array) != 0
        assert np.array_equal(inside, lab == value), f"segment {name} is not the label {value} region"
    rows = logic.risk_structure_rows(seg_node)
    assert ("aorta", "segment (hidden)", default_margin("aorta")) in rows
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0  # temporary exports removed


def test_hidden_segment_is_avoided_with_its_own_margin(scene, case):
    ct, labels, targets = case
    ct_node, seg_node = scenarios.risk_segmentation_case(scene, ct, labels, hidden=("aorta", "kidney"))
    tnode = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "targets")
    tnode.AddControlPoint(list(map(float, targets[0]["point_ras"])), "A")
    margins = logic.margins_from_rows([("aorta", "12"), ("kidney", "7.5")])
    result, nodes = logic.plan(scene, ct_node, tnode, seg_node, margins=margins, top_n=3, shared_entry=False)
    assert result.trajectories and len(nodes) == len(result.trajectories)
    for t in result.trajectories:
        assert t.margin_mm["aorta"] == 12.0 and t.margin_mm["kidney"] == 7.5
        assert t.margin_mm["ivc"] == default_margin("ivc")
        for name in abdomen.RISK_LABELS.values():
            assert t.clearance_mm[name] >= t.margin_mm[name] - 1e-6, (t.name, name)


def test_duplicate_segment_names_and_bad_margins_are_refused(scene, case):
    ct, labels, _ = case
    ct_node, seg_node = scenarios.risk_segmentation_case(scene, ct, labels)
    seg = seg_node.GetSegmentation()
    seg.GetNthSegment(1).SetName("bone")
    with pytest.raises(TrajectoryPlannerError, match="two segments are named 'bone'"):
        logic.user_labelmaps(scene, seg_node, ct_node)
    with pytest.raises(TrajectoryPlannerError, match="margin of 'aorta'"):
        logic.margins_from_rows([("aorta", "ten")])
    with pytest.raises(TrajectoryPlannerError, match="0 mm or more"):
        logic.margins_from_rows([("aorta", "-2")])


@pytest.mark.parametrize("entry, target", [
    ((-150.0, 20.0, 0.0), (-70.0, 20.0, 0.0)),       # lateral, in the axial plane
    ((-120.0, 110.0, 45.0), (-70.0, 20.0, 0.0)),     # double-oblique
    ((-60.0, 30.0, 120.0), (-70.0, 20.0, 0.0)),      # nearly craniocaudal
])
def test_reslice_plane_contains_entry_and_target(scene, entry, target):
    line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "A-1")
    line.AddControlPoint(list(entry), "entry")
    line.AddControlPoint(list(target), "A")
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    yellow = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Yellow")
    logic.reslice_along_path(line, red, yellow)
    m = np.array([[red.GetSliceToRAS().GetElement(i, j) for j in range(4)] for i in range(4)])
    normal, origin = m[:3, 2], m[:3, 3]
    for p in (entry, target):
        assert abs(np.dot(np.subtract(p, origin), normal)) < 0.5
    d = np.subtract(target, entry) / np.linalg.norm(np.subtract(target, entry))
    assert abs(np.dot(m[:3, 0], d)) > 0.999  # the path runs along the view's horizontal axis
    y = np.array([[yellow.GetSliceToRAS().GetElement(i, j) for j in range(4)] for i in range(4)])
    assert abs(np.dot(y[:3, 2], d)) > 0.999 and np.allclose(y[:3, 3], target, atol=1e-6)


def test_button_states_need_ct_targets_and_a_selected_path(scene):
    pn = SimpleNamespace(ctVolume=None, targets=None, selectedTrajectory=None)
    s = logic.button_states(pn)
    assert not s["compute"] and not s["reslice"] and s["stop"] and s["emergency"]
    pn.ctVolume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    pn.targets = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    assert not logic.button_states(pn)["compute"]  # no target point yet
    pn.targets.AddControlPoint([0.0, 0.0, 0.0], "A")
    assert logic.button_states(pn)["compute"]
    assert not logic.button_states(pn)["sendTarget"]


def test_robot_buttons_without_a_session_say_so(scene):
    with pytest.raises(TrajectoryPlannerError, match="own console"):
        logic.robot_stop(None)
    with pytest.raises(TrajectoryPlannerError, match="emergency stop"):
        logic.robot_emergency(None)
    assert not logic.robot_connected(None)


def test_logic_scenario_of_the_self_test(scene):
    out = scenarios.scenario_logic_hidden_segments_and_reslice(scene)
    assert out["segments"] == 6 and out["reslice_off_plane_mm"] < 0.5

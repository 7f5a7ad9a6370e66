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


# ---------------------------------------------------------------------------------------------- what the plan shows
def _visible(node) -> bool:
    return any(node.GetNthDisplayNode(i).GetVisibility() for i in range(node.GetNumberOfDisplayNodes()))


def _all(scene, cls):
    return [scene.GetNthNodeByClass(i, cls) for i in range(scene.GetNumberOfNodesByClass(cls))]


def _pos(node, i):
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(i, p)
    return np.array(p)


@pytest.fixture
def planned(scene, case):
    from SmartBiopsyCoreLib.dataio.volumes_mrml import add_volume_node

    ct, labels, targets = case
    ct_node = add_volume_node(scene, ct, "Planning CT")
    tnode = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Habitat targets")
    for t in targets:
        tnode.AddControlPoint(list(map(float, t["point_ras"])), t["name"])
    tnode.CreateDefaultDisplayNodes()
    result, nodes = logic.plan(scene, ct_node, tnode, top_n=3, shared_entry=True,
                               auto_structures=True)
    return result, nodes, tnode


def test_plan_shows_one_chosen_path_per_target_in_its_habitat_colour(scene, planned):
    from SmartBiopsyCoreLib import palette

    result, nodes, _ = planned
    targets = sorted({t.target for t in result.trajectories})
    assert targets == ["A", "B", "C"] and len(result.trajectories) > len(targets)
    # the table's rows (plan order) point at the node of the same trajectory
    assert len(nodes) == len(result.trajectories)
    for node, t in zip(nodes, result.trajectories):
        assert np.allclose(_pos(node, 0), t.entry_ras, atol=1e-4) and np.allclose(_pos(node, 1), t.target_ras, atol=1e-4)
        assert node.GetAttribute("TrajectoryPlanner.Target") == t.target
    lines = [n for n in _all(scene, "vtkMRMLMarkupsLineNode") if n.GetAttribute("TrajectoryPlanner.Target")]
    visible = sorted((n for n in lines if _visible(n)), key=lambda n: n.GetName())
    assert [n.GetName() for n in visible] == [f"Chosen path {x}" for x in targets]
    for n in visible:
        region = n.GetAttribute("TrajectoryPlanner.Region")
        assert n.GetAttribute("TrajectoryPlanner.Rank") == "1"
        assert np.allclose(n.GetDisplayNode().GetSelectedColor(), palette.region_colour(region), atol=1e-3)
        assert n.GetNthControlPointLabel(1) == f"target {region}"
    shared = result.shared_entry.trajectories if result.shared_entry is not None else []
    assert len(lines) == len(result.trajectories) + len(shared)


def test_plan_puts_the_candidates_in_a_hidden_folder(scene, planned):
    import vtk

    from SmartBiopsyLib.scene_build import CANDIDATE_FOLDER

    result, nodes, _ = planned
    sh = scene.GetSubjectHierarchyNode()
    folder = sh.GetItemByName(logic.CANDIDATE_FOLDER)
    assert logic.CANDIDATE_FOLDER == CANDIDATE_FOLDER  # the same folder as in the case scene
    assert folder and sh.GetItemName(sh.GetItemParent(folder)) == logic.PLAN_FOLDER
    assert sh.GetItemDisplayVisibility(folder) == 0
    ids = vtk.vtkIdList()
    sh.GetItemChildren(folder, ids)
    inside = {sh.GetItemDataNode(ids.GetId(i)).GetID() for i in range(ids.GetNumberOfIds())}
    candidates = [n for n in _all(scene, "vtkMRMLMarkupsLineNode") if n.GetAttribute("TrajectoryPlanner.Candidate")]
    assert candidates and {n.GetID() for n in candidates} == inside
    assert not any(_visible(n) for n in candidates)
    assert sum(1 for n in nodes if n.GetAttribute("TrajectoryPlanner.Candidate") == "1") == len(nodes) - 3


def test_plan_shows_the_planned_notch_tip_apart_from_the_target(scene, planned):
    from SmartBiopsyCoreLib import palette
    from TrajectoryPlannerLib.planning.mrml import chosen_trajectories

    result, _, _ = planned
    fids = {n.GetName(): n for n in _all(scene, "vtkMRMLMarkupsFiducialNode")}
    tips = fids["Planned notch tips"]
    assert _visible(tips)
    for k, t in enumerate(chosen_trajectories(result)):
        assert tips.GetNthControlPointLabel(k) == f"planned notch tip {t.target}"
        assert np.allclose(_pos(tips, k), t.tip_ras, atol=1e-4)
        assert np.linalg.norm(np.asarray(t.tip_ras) - np.asarray(t.target_ras)) > 1.0
    # every path of the table tells the needle check where its planned notch tip is (beyond the target)
    for node, t in zip(planned[1], result.trajectories):
        entry, target = _pos(node, 0), _pos(node, 1)
        beyond = float(node.GetAttribute(logic.TIP_BEYOND_TARGET_ATTRIBUTE))
        assert beyond > 1.0
        assert np.allclose(target + beyond * (target - entry) / np.linalg.norm(target - entry), t.tip_ras, atol=1e-3)
    tip_colour = tips.GetDisplayNode().GetSelectedColor()
    assert np.allclose(tip_colour, palette.NOTCH_TIP_COLOUR, atol=1e-3)
    assert all(not np.allclose(tip_colour, palette.region_colour(r), atol=0.05) for r in "ABC")
    # no visible point called "target" sits on a planned tip
    tip_points = [np.asarray(t.tip_ras) for t in chosen_trajectories(result)]
    for node in _all(scene, "vtkMRMLMarkupsNode"):
        if not _visible(node):
            continue
        for i in range(node.GetNumberOfControlPoints()):
            if "target" in node.GetNthControlPointLabel(i):
                assert min(np.linalg.norm(p - _pos(node, i)) for p in tip_points) > 1.0, node.GetName()


def test_a_new_plan_hides_the_previous_one(scene, planned):
    result, _, tnode = planned
    again = logic.show_plan(scene, result)
    lines = [n for n in _all(scene, "vtkMRMLMarkupsLineNode") if n.GetAttribute("TrajectoryPlanner.Target")]
    visible = [n for n in lines if _visible(n)]
    assert sorted(n.GetID() for n in visible) == sorted(n.GetID() for n in again["chosen"])
    tips = [n for n in _all(scene, "vtkMRMLMarkupsFiducialNode") if n.GetName() == "Planned notch tips" and _visible(n)]
    assert [n.GetID() for n in tips] == [again["notch_tips"].GetID()]
    assert _visible(tnode)  # the planner's input targets are left alone


def _under_hidden_folder(scene, node) -> bool:
    sh = scene.GetSubjectHierarchyNode()
    item = sh.GetItemParent(sh.GetItemByDataNode(node))
    while item and item != sh.GetSceneItemID():
        if sh.GetItemDisplayVisibility(item) == 0:
            return True
        item = sh.GetItemParent(item)
    return False


def test_a_candidate_selected_in_the_table_is_shown_until_another_is_selected(scene, planned):
    result, nodes, _ = planned
    chosen = [n for n in nodes if n.GetAttribute("TrajectoryPlanner.Chosen") == "1"]
    first, second = [n for n in nodes if n.GetAttribute("TrajectoryPlanner.Candidate") == "1"][:2]
    assert not _visible(first) and _under_hidden_folder(scene, first)
    logic.show_selected_path(scene, first)
    assert _visible(first) and not _under_hidden_folder(scene, first)
    logic.show_selected_path(scene, second)
    assert _visible(second) and not _under_hidden_folder(scene, second)
    assert not _visible(first) and _under_hidden_folder(scene, first)  # back in its hidden folder
    logic.show_selected_path(scene, chosen[0])
    assert not _visible(second) and _under_hidden_folder(scene, second)
    assert all(_visible(n) and not _under_hidden_folder(scene, n) for n in chosen)


def test_widget_shows_the_path_selected_in_the_table_through_the_logic():
    import ast
    from pathlib import Path

    src = (Path(__file__).resolve().parents[2] / "TrajectoryPlanner" / "TrajectoryPlanner.py").read_text()
    fns = {n.name: ast.unparse(n) for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)}
    assert "self.logic.showSelectedPath(self._lineNodes[row])" in fns["onTrajectoryClicked"]
    assert "logic.show_selected_path(self.scene, lineNode)" in fns["showSelectedPath"]


def test_the_panel_report_reads_the_newest_plan_with_the_trajectory_names_and_tips(scene, planned):
    from SmartBiopsyLib.report.scene_case import _trajectory_dict, trajectory_nodes

    result, _, _ = planned
    again = logic.show_plan(scene, result)  # Compute pressed a second time
    rows = [_trajectory_dict(n) for n in trajectory_nodes(scene)]
    assert sorted(r["name"] for r in rows) == sorted(t.name for t in result.trajectories)  # "A-1", not "Chosen path A"
    by_name = {t.name: t for t in result.trajectories}
    for r in rows:
        t = by_name[r["name"]]
        assert r["target"] == t.target and r["rank"] == t.rank
        assert np.allclose(r["target_ras"], t.target_ras, atol=1e-3) and np.allclose(r["tip_ras"], t.tip_ras, atol=1e-2)
    assert {n.GetID() for n in trajectory_nodes(scene)} == {n.GetID() for n in again["by_trajectory"]}

"""Planner MRML glue on a real headless scene."""
import numpy as np
import pytest

from TrajectoryPlannerLib.planning import mrml as planner_mrml
from TrajectoryPlannerLib.errors import TrajectoryPlannerError


@pytest.fixture(scope="module")
def scene():
    try:
        from SmartBiopsyCoreLib.runtime import new_scene
        return new_scene()
    except ImportError:  # pragma: no cover
        import slicer
        return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def shown(scene):
    return planner_mrml.scenario_plan_synthetic(scene)


def test_trajectories_become_named_line_nodes_with_entry_and_target(scene, shown):
    result = shown["result"]
    nodes = shown["trajectories"]
    assert len(nodes) == len(result.trajectories) + 3
    for node, tr in zip(nodes, result.trajectories):
        assert node.GetName() == tr.name and node.IsA("vtkMRMLMarkupsLineNode")
        assert scene.GetNodeByID(node.GetID()) is node
        p0, p1 = [0.0] * 3, [0.0] * 3
        node.GetNthControlPointPositionWorld(0, p0)
        node.GetNthControlPointPositionWorld(1, p1)
        assert np.allclose(p0, tr.entry_ras, atol=1e-4) and np.allclose(p1, tr.target_ras, atol=1e-4)
        assert node.GetLineLengthWorld() == pytest.approx(tr.length_mm, abs=1e-3)
        assert float(node.GetAttribute("TrajectoryPlanner.LengthMM")) == pytest.approx(tr.length_mm, abs=0.01)
        assert int(node.GetAttribute("TrajectoryPlanner.Rank")) == tr.rank
        for s, v in tr.clearance_mm.items():
            assert float(node.GetAttribute(f"TrajectoryPlanner.ClearanceMM.{s}")) == pytest.approx(v, abs=0.01)
    assert {n.GetName() for n in nodes[-3:]} == {"A-shared", "B-shared", "C-shared"}
    assert all(n.GetAttribute("TrajectoryPlanner.SharedEntry") == "1" for n in nodes[-3:])


def test_skin_model_node_shows_the_clearance_scalar(scene, shown):
    node = shown["skin"]
    assert node.IsA("vtkMRMLModelNode") and scene.GetNodeByID(node.GetID()) is node
    poly = node.GetPolyData()
    arr = poly.GetPointData().GetArray("ClearanceMM")
    assert arr is not None and arr.GetNumberOfTuples() == poly.GetNumberOfPoints()
    lo, hi = arr.GetRange()
    assert lo == 0.0 and hi > 0.0  # inaccessible skin is 0, some skin is accessible
    d = node.GetDisplayNode()
    assert d.GetScalarVisibility() and d.GetActiveScalarName() == "ClearanceMM"
    assert d.GetColorNodeID() is not None


def test_bad_inputs_are_clear_errors(scene, shown):
    import vtk
    with pytest.raises(TrajectoryPlannerError, match="scene"):
        planner_mrml.add_trajectory_node(None, shown["result"].trajectories[0])
    with pytest.raises(TrajectoryPlannerError, match="empty"):
        planner_mrml.add_skin_model_node(scene, vtk.vtkPolyData())


def test_only_the_chosen_path_per_target_is_visible(shown):
    """The other candidates and the shared-entry paths are in the scene but hidden (issue 19: the chosen path
    per target visible, candidates hidden)."""
    visible = [n for n in shown["trajectories"] if n.GetDisplayNode().GetVisibility()]
    best = planner_mrml.chosen_trajectories(shown["result"])
    assert [n.GetName() for n in visible] == [tr.name for tr in best]
    assert len(shown["trajectories"]) > len(visible)

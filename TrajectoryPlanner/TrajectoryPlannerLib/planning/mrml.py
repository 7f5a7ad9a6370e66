"""MRML glue for the planner: trajectories as markups line nodes, the skin accessibility model node.

Functions take the scene explicitly and return the nodes they create; the caller (module Logic or a test)
owns them. Coordinates are RAS mm, as MRML holds them. No slicer.app / slicer.mrmlScene here.
"""
from __future__ import annotations

import logging

from TrajectoryPlannerLib.errors import TrajectoryPlannerError

logger = logging.getLogger(__name__)

ATTR = "TrajectoryPlanner."
#: Colour tables tried in order for the skin map (the headless runtime and desktop Slicer both have these).
SKIN_COLOR_IDS = ("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeRainbow",
                  "vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
TARGET_COLOURS = {"A": (0.85, 0.2, 0.2), "B": (0.2, 0.7, 0.2), "C": (0.2, 0.4, 0.9)}


def add_trajectory_node(scene, trajectory, colour=None):
    """One vtkMRMLMarkupsLineNode named like the trajectory ("A-1"): point 0 entry, point 1 target (RAS mm).

    Attributes ``TrajectoryPlanner.*`` carry length, score, rank, angle, needle, target, region and the
    clearance (mm) to every structure.
    """
    if scene is None:
        raise TrajectoryPlannerError("no MRML scene given; pass the scene that should hold the trajectories")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", trajectory.name)
    node.AddControlPoint([float(v) for v in trajectory.entry_ras], "entry")
    node.AddControlPoint([float(v) for v in trajectory.target_ras], trajectory.target)
    attrs = {
        "Target": trajectory.target, "Region": trajectory.region, "Needle": trajectory.needle,
        "LengthMM": f"{trajectory.length_mm:.2f}", "Score": f"{trajectory.score:.4f}", "Rank": str(trajectory.rank),
        "AngleToAxialDeg": f"{trajectory.angle_to_axial_deg:.2f}",
        "MinMarginExcessMM": f"{trajectory.min_margin_excess_mm:.2f}",
    }
    for name, value in trajectory.clearance_mm.items():
        attrs[f"ClearanceMM.{name}"] = f"{value:.2f}"
    for k, v in attrs.items():
        node.SetAttribute(ATTR + k, v)
    node.CreateDefaultDisplayNodes()
    d = node.GetDisplayNode()
    if d is not None:
        d.SetSelectedColor(*(colour or TARGET_COLOURS.get(trajectory.region or trajectory.target, (0.9, 0.7, 0.1))))
        d.SetPropertiesLabelVisibility(True)
    node.SetLocked(True)
    return node


def add_trajectory_nodes(scene, result, include_shared: bool = True, best_only: bool = False) -> list:
    """Line nodes for the plan's trajectories (and the shared-entry fan); returns them in plan order."""
    nodes = []
    for tr in result.trajectories:
        if best_only and tr.rank != 1:
            continue
        nodes.append(add_trajectory_node(scene, tr))
    if include_shared and result.shared_entry is not None:
        for tr in result.shared_entry.trajectories:
            n = add_trajectory_node(scene, tr)
            n.SetAttribute(ATTR + "SharedEntry", "1")
            nodes.append(n)
    return nodes


def add_skin_model_node(scene, poly, name: str = "Skin accessibility", scalar: str = "ClearanceMM"):
    """vtkMRMLModelNode of the skin map (RAS polydata) with ``scalar`` shown through a colour table."""
    if scene is None:
        raise TrajectoryPlannerError("no MRML scene given; pass the scene that should hold the skin model")
    if poly is None or poly.GetNumberOfPoints() == 0:
        raise TrajectoryPlannerError("the skin model is empty; build it from a plan first")
    if poly.GetPointData().GetArray(scalar) is None:
        raise TrajectoryPlannerError(f"the skin model has no '{scalar}' values; build it with skinmap.skin_model")
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    node.SetAndObservePolyData(poly)
    node.CreateDefaultDisplayNodes()
    d = node.GetDisplayNode()
    d.SetActiveScalarName(scalar)
    d.SetScalarVisibility(True)
    for cid in SKIN_COLOR_IDS:
        if scene.GetNodeByID(cid) is not None:
            d.SetAndObserveColorNodeID(cid)
            break
    lo, hi = poly.GetPointData().GetArray(scalar).GetRange()
    d.SetScalarRangeFlag(0)  # manual range: 0 (inaccessible) .. best clearance
    d.SetScalarRange(0.0, max(float(hi), 1.0))
    node.SetAttribute(ATTR + "SkinScalar", scalar)
    return node


def show_plan(scene, result, skin_poly=None, include_shared: bool = True) -> dict:
    """Trajectory line nodes and (if given) the skin model node; returns {"trajectories": [...], "skin": node}."""
    out = {"trajectories": add_trajectory_nodes(scene, result, include_shared), "skin": None}
    if skin_poly is not None:
        out["skin"] = add_skin_model_node(scene, skin_poly)
    return out


def scenario_plan_synthetic(scene) -> dict:
    """Self-test scenario: plan three targets on the synthetic abdomen and show the result in ``scene``."""
    from TrajectoryPlannerLib.planning import engine, skinmap
    from SmartBiopsyCoreLib.phantom import abdomen as synthetic
    ct, labels, targets = synthetic.make_abdomen()
    result = engine.plan(ct, targets, labelmaps=[(labels, synthetic.RISK_LABELS)])
    nodes = show_plan(scene, result, skinmap.skin_model(result))
    nodes["result"] = result
    return nodes

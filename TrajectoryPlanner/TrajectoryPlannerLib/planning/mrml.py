"""MRML glue for the planner: trajectories as markups line nodes, the skin accessibility model node.

Functions take the scene explicitly and return the nodes they create; the caller (module Logic or a test)
owns them. Coordinates are RAS mm, as MRML holds them. No slicer.app / slicer.mrmlScene here.
"""
from __future__ import annotations

import logging

from SmartBiopsyCoreLib import palette
from TrajectoryPlannerLib.errors import TrajectoryPlannerError

logger = logging.getLogger(__name__)

ATTR = "TrajectoryPlanner."
#: Colour tables tried in order for the skin map (the headless runtime and desktop Slicer both have these).
SKIN_COLOR_IDS = ("vtkMRMLColorTableNodeFileViridis.txt", "vtkMRMLColorTableNodeRainbow",
                  "vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
#: Path colour per habitat region: the project palette (the same colours as the habitat segmentation).
TARGET_COLOURS = dict(palette.REGION_COLOURS)


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
        d.SetSelectedColor(*(colour or palette.region_colour(trajectory.region or trajectory.target)))
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


def chosen_trajectories(result) -> list:
    """The best-ranked trajectory per target (what the workflow sends to the robot), in target order."""
    best: dict = {}
    for tr in result.trajectories:
        if tr.target not in best or tr.rank < best[tr.target].rank:
            best[tr.target] = tr
    return [best[k] for k in sorted(best)]


def _hide(node) -> None:
    for i in range(node.GetNumberOfDisplayNodes()):
        d = node.GetNthDisplayNode(i)
        if d is not None:
            d.SetVisibility(False)


def add_chosen_plan_nodes(scene, result, chosen: list | None = None) -> dict:
    """The plan as a reader of the scene should see it (RAS mm, CT world); returns the created nodes.

    ``chosen``: one line node per target, named "Chosen path A", visible, in the habitat colour; control
    points "entry" and "target A" (the target itself). ``notch_tips``: a fiducial node "Planned notch tips"
    with one point "planned notch tip A" per target where the plan places the needle tip beyond the target
    (``tip_ras``), in the notch-tip colour. ``candidates``: every other trajectory and the shared-entry
    alternatives, their display nodes hidden (attribute ``TrajectoryPlanner.Candidate`` = "1"). ``chosen``
    defaults to :func:`chosen_trajectories`.
    """
    if scene is None:
        raise TrajectoryPlannerError("no MRML scene given; pass the scene that should hold the trajectories")
    chosen = chosen_trajectories(result) if chosen is None else list(chosen)
    out = {"chosen": [], "candidates": [], "notch_tips": None}
    for tr in chosen:
        node = add_trajectory_node(scene, tr)
        node.SetName(f"Chosen path {tr.target}")
        node.SetNthControlPointLabel(1, f"target {tr.target}")
        node.SetAttribute(ATTR + "Chosen", "1")
        node.GetDisplayNode().SetVisibility(True)
        out["chosen"].append(node)
    tips = [tr for tr in chosen if getattr(tr, "tip_ras", None) is not None]
    if tips:
        fid = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Planned notch tips")
        for tr in tips:
            idx = fid.AddControlPoint(*[float(v) for v in tr.tip_ras], f"planned notch tip {tr.target}")
            fid.SetNthControlPointDescription(idx, f"where the plan puts the needle tip for target {tr.target} "
                                                   "(beyond the target so that the notch covers it)")
        fid.CreateDefaultDisplayNodes()
        fid.GetDisplayNode().SetSelectedColor(*palette.NOTCH_TIP_COLOUR)
        fid.GetDisplayNode().SetColor(*palette.NOTCH_TIP_COLOUR)
        fid.SetLocked(True)
        out["notch_tips"] = fid
    chosen_ids = {id(tr) for tr in chosen}
    others = [tr for tr in result.trajectories if id(tr) not in chosen_ids]
    shared = list(result.shared_entry.trajectories) if result.shared_entry is not None else []
    for tr in others + shared:
        node = add_trajectory_node(scene, tr, colour=palette.NEUTRAL_COLOUR)
        node.SetName(f"Candidate path {tr.name}")
        node.SetAttribute(ATTR + "Candidate", "1")
        if any(tr is s for s in shared):
            node.SetAttribute(ATTR + "SharedEntry", "1")
        _hide(node)
        out["candidates"].append(node)
    return out


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
    """Trajectory line nodes and (if given) the skin model node; returns {"trajectories": [...], "skin": node}.

    Only the chosen (best-ranked) path per target is visible; the other candidates and the shared-entry paths
    are created hidden, as in the case scene."""
    out = {"trajectories": add_trajectory_nodes(scene, result, include_shared), "skin": None}
    chosen = {id(tr) for tr in chosen_trajectories(result)}
    shown = list(result.trajectories)
    for i, node in enumerate(out["trajectories"]):
        if not (i < len(shown) and id(shown[i]) in chosen):
            _hide(node)
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

"""What the Trajectory Planner panel does, on an explicit MRML scene (the module's Logic adapts to it).

MRML-glue layer: takes the scene and the nodes explicitly and may use Slicer's MRML classes, never
``slicer.app``, ``slicer.mrmlScene``, ``slicer.modules``, qt or dialogs. The widget binds its GUI to the
parameter node and calls these functions; the module self-test and ``Testing/mrml`` call the same API.
World frame RAS mm; margins in mm; angles in degrees.

The robot-panel glue here only forwards to ``TrajectoryPlannerLib.robot`` (its protocol lives there).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from TrajectoryPlannerLib.errors import RobotBridgeError, TrajectoryPlannerError

logger = logging.getLogger(__name__)

RISK_COLUMNS = ("structure", "source", "margin (mm)")
#: Automatic structures found in the CT (names as the risk model uses them).
AUTO_STRUCTURES = ("bone", "gas")


# ---------------------------------------------------------------------------------------------- risk
def segments(segmentation_node) -> list[tuple[str, str, bool]]:
    """(segment ID, name, visible) of every segment, hidden ones included, in the segmentation's order."""
    if segmentation_node is None:
        return []
    seg = segmentation_node.GetSegmentation()
    display = segmentation_node.GetDisplayNode()
    out = []
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        visible = True if display is None else bool(display.GetSegmentVisibility(sid))
        out.append((sid, seg.GetSegment(sid).GetName(), visible))
    return out


def risk_structure_rows(segmentation_node, auto_structures: bool = True) -> list[tuple[str, str, float]]:
    """(name, source, default margin mm) for the automatic structures and every segment (hidden ones too:
    each is exported and avoided with its own margin)."""
    from TrajectoryPlannerLib.planning.risk import default_margin

    rows = [(n, "CT", default_margin(n)) for n in AUTO_STRUCTURES] if auto_structures else []
    for _, name, visible in segments(segmentation_node):
        rows.append((name, "segment" if visible else "segment (hidden)", default_margin(name)))
    return rows


def margins_from_rows(rows) -> dict[str, float]:
    """{structure name: margin mm} from (name, margin text or number) pairs of the risk table; a margin that is
    not a non-negative number is refused with a sentence."""
    out = {}
    for name, margin in rows:
        try:
            value = float(margin)
        except (TypeError, ValueError):
            raise TrajectoryPlannerError(f"the margin of '{name}' is '{margin}', not a number of mm; type a "
                                         "margin of 0 mm or more") from None
        if not np.isfinite(value) or value < 0:
            raise TrajectoryPlannerError(f"the margin of '{name}' is {value:g} mm; type a margin of 0 mm or more")
        out[str(name)] = value
    return out


def user_labelmaps(scene, segmentation_node, reference_node) -> list:
    """Every segment (visible or hidden) as its own label map on ``reference_node``'s grid:
    [(RasVolume with 1 = inside, {1: segment name}), ...] in segment order. One export per segment, so no
    label value is ever mapped to another segment's name and overlapping segments stay whole."""
    import vtk

    import slicer
    from SmartBiopsyCoreLib.dataio.volumes_mrml import volume_from_node

    if segmentation_node is None:
        return []
    if scene is None:
        raise TrajectoryPlannerError("no MRML scene given; pass the scene that holds the segmentation")
    out = []
    names = {}
    for sid, name, _visible in segments(segmentation_node):
        if name in names:
            raise TrajectoryPlannerError(f"two segments are named '{name}'; rename one so each gets its own margin")
        names[name] = sid
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"risk {name}")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(sid)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_node)
            if not ok:
                raise TrajectoryPlannerError(f"segment '{name}' could not be exported to the CT grid; check the segmentation")
            try:
                vol = volume_from_node(labelmap)
            except ValueError:
                logger.info("segment '%s' is empty; not a risk structure", name)
                continue
            out.append((vol.with_array((vol.array != 0).astype(np.uint8)), {1: name}))
        finally:
            scene.RemoveNode(labelmap)
    return out


def targets_from_node(targets_node) -> list[dict]:
    """Planner targets from a point list (world RAS mm); labels A/B/C become the habitat region."""
    if targets_node is None or targets_node.GetNumberOfControlPoints() == 0:
        raise TrajectoryPlannerError("no targets; place at least one target point (A, B or C) first")
    out = []
    for i in range(targets_node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        targets_node.GetNthControlPointPositionWorld(i, p)
        label = targets_node.GetNthControlPointLabel(i) or f"T{i + 1}"
        out.append({"name": label, "region": label if label in ("A", "B", "C") else "", "point_ras": p})
    return out


def plan(scene, ct_node, targets_node, segmentation_node=None, needle: str = "15G/16G-16cm", margins=None,
         mode: str = "oblique", max_angle_deg: float = 60.0, position: str = "supine", top_n: int = 5,
         shared_entry: bool = True, auto_structures: bool = True, progress=None, should_cancel=None):
    """Plan and show the trajectories as :func:`show_plan` does (the chosen path per target visible, every other
    candidate hidden in a folder, the planned notch tips as their own points). Returns (PlanResult, [line node per
    trajectory, in plan order, for the trajectory table]); the scene owns the nodes."""
    from SmartBiopsyCoreLib.dataio.volumes_mrml import ct_from_node
    from TrajectoryPlannerLib.planning import engine

    settings = engine.PlanSettings(mode=mode, max_angle_deg=max_angle_deg, top_n=top_n, shared_entry=shared_entry)
    result = engine.plan(ct_from_node(ct_node, "select the planning CT as the CT volume"), targets_from_node(targets_node), needle,
                         user_labelmaps(scene, segmentation_node, ct_node), margins or None, settings, position,
                         auto_structures, progress, should_cancel)
    return result, show_plan(scene, result)["by_trajectory"]


# ---------------------------------------------------------------------------------------------- plan display
#: Subject-hierarchy folders of a plan shown by the panel (the same names as in the case scene).
PLAN_FOLDER = "Plan"
CANDIDATE_FOLDER = "Candidate paths (hidden)"
#: Subject-hierarchy attribute marking a folder made by :func:`show_plan`.
PLAN_FOLDER_ATTRIBUTE = "TrajectoryPlanner.PlanFolder"
#: Line-node attributes: the trajectory's own name ("A-2"), and "1" on the paths of a plan a newer one replaced.
NAME_ATTRIBUTE = "TrajectoryPlanner.Name"
SUPERSEDED_ATTRIBUTE = "TrajectoryPlanner.Superseded"
#: Line-node attribute set by add_chosen_plan_nodes on every candidate (not chosen) path.
ATTR_CANDIDATE = "TrajectoryPlanner.Candidate"
#: Line-node attribute: how far (mm, along the path) beyond the target the plan puts the needle tip (the planned
#: notch tip), so that a needle check compares the needle with the planned tip, not with the target.
TIP_BEYOND_TARGET_ATTRIBUTE = "TrajectoryPlanner.TipBeyondTargetMM"
#: Line-node attribute: this candidate was taken out of the hidden folder because it is selected in the table.
SHOWN_CANDIDATE_ATTRIBUTE = "TrajectoryPlanner.ShownCandidate"


def _hide_branch(scene, sh, folder: int) -> None:
    """Hide a folder item as Slicer's Data module does (a folder display node, visibility off; the headless
    subject hierarchy has no folder plugin to create it) and every node below it."""
    import vtk

    disp = sh.GetItemDataNode(folder)
    if disp is None:
        disp = scene.AddNewNodeByClass("vtkMRMLFolderDisplayNode", sh.GetItemName(folder))
        sh.SetItemDataNode(folder, disp)
    disp.SetVisibility(False)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(folder, ids, True)
    for i in range(ids.GetNumberOfIds()):
        node = sh.GetItemDataNode(ids.GetId(i))
        if node is None:
            continue
        if node.IsA("vtkMRMLDisplayNode"):
            node.SetVisibility(False)
        elif node.IsA("vtkMRMLDisplayableNode"):
            for k in range(node.GetNumberOfDisplayNodes()):
                if node.GetNthDisplayNode(k) is not None:
                    node.GetNthDisplayNode(k).SetVisibility(False)
    sh.SetItemExpanded(folder, False)


def show_plan(scene, result) -> dict:
    """Show a plan as the case scene does (RAS mm, CT world), through
    :func:`TrajectoryPlannerLib.planning.mrml.add_chosen_plan_nodes`: in a subject-hierarchy folder "Plan", one
    visible line "Chosen path A" per target (habitat colour; points "entry" and "target A") and the point list
    "Planned notch tips" ("planned notch tip A", where the plan puts the needle tip beyond the target, in the
    notch-tip colour); every other candidate and the shared-entry alternatives in its hidden sub-folder
    "Candidate paths (hidden)". Plans shown before by this function are hidden (kept, not deleted), so only the
    newest plan's chosen paths are visible.

    Returns {"chosen", "candidates", "notch_tips", "folder", "candidate_folder", "by_trajectory"}:
    ``by_trajectory`` is the line node of each of ``result.trajectories`` in plan order (the trajectory table's
    rows); each of them carries ``TrajectoryPlanner.TipBeyondTargetMM`` (the planned notch tip's distance beyond the
    target along the path). The scene owns the nodes."""
    import vtk

    from TrajectoryPlannerLib.planning import mrml as planner_mrml

    if scene is None:
        raise TrajectoryPlannerError("no MRML scene given; pass the scene that should hold the trajectories")
    sh = scene.GetSubjectHierarchyNode()
    earlier = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), earlier, True)
    for i in range(earlier.GetNumberOfIds()):
        item = earlier.GetId(i)
        if sh.GetItemAttribute(item, PLAN_FOLDER_ATTRIBUTE) == "1":
            _hide_branch(scene, sh, item)
            below = vtk.vtkIdList()
            sh.GetItemChildren(item, below, True)
            for k in range(below.GetNumberOfIds()):
                node = sh.GetItemDataNode(below.GetId(k))
                if node is not None and node.GetAttribute("TrajectoryPlanner.Rank") is not None:
                    node.SetAttribute(SUPERSEDED_ATTRIBUTE, "1")  # an earlier plan: not read by the report
    shown = planner_mrml.add_chosen_plan_nodes(scene, result)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), PLAN_FOLDER)
    sh.SetItemAttribute(folder, PLAN_FOLDER_ATTRIBUTE, "1")
    for node in shown["chosen"] + ([shown["notch_tips"]] if shown["notch_tips"] is not None else []):
        sh.SetItemParent(sh.GetItemByDataNode(node) or sh.CreateItem(folder, node), folder)
    candidate_folder = None
    if shown["candidates"]:
        candidate_folder = sh.CreateFolderItem(folder, CANDIDATE_FOLDER)
        for node in shown["candidates"]:
            sh.SetItemParent(sh.GetItemByDataNode(node) or sh.CreateItem(candidate_folder, node), candidate_folder)
        _hide_branch(scene, sh, candidate_folder)

    def key(target, rank, entry, point):
        return (str(target), str(rank)) + tuple(np.round(np.asarray(list(entry) + list(point), float), 3))

    by_key = {}
    for node in shown["chosen"] + shown["candidates"]:
        if node.GetAttribute("TrajectoryPlanner.SharedEntry") != "1":
            entry, point = [0.0] * 3, [0.0] * 3
            node.GetNthControlPointPosition(0, entry)
            node.GetNthControlPointPosition(1, point)
            by_key[key(node.GetAttribute("TrajectoryPlanner.Target"), node.GetAttribute("TrajectoryPlanner.Rank"),
                       entry, point)] = node
    by_trajectory = [by_key[key(t.target, t.rank, t.entry_ras, t.target_ras)] for t in result.trajectories]
    for t, node in zip(result.trajectories, by_trajectory):
        node.SetAttribute(NAME_ATTRIBUTE, str(t.name))  # "A-1": the node itself is named "Chosen path A"
        if getattr(t, "tip_ras", None) is not None:  # the planned notch tip, for the needle check of Smart Biopsy
            d = np.asarray(t.target_ras, float) - np.asarray(t.entry_ras, float)
            beyond = float(np.dot(np.asarray(t.tip_ras, float) - np.asarray(t.target_ras, float), d / np.linalg.norm(d)))
            node.SetAttribute(TIP_BEYOND_TARGET_ATTRIBUTE, f"{beyond:.3f}")
    shown.update(folder=folder, candidate_folder=candidate_folder, by_trajectory=by_trajectory)
    return shown


def show_selected_path(scene, line_node) -> None:
    """Show the path selected in the trajectory table. A candidate (hidden in "Candidate paths (hidden)" by
    :func:`show_plan`) is moved up into its plan folder and shown; the candidate shown for the previous selection
    goes back into the hidden folder, hidden. The chosen paths are left as they are. ``line_node`` None or not
    a path of :func:`show_plan`: only the previous selection is put back."""
    if scene is None:
        raise TrajectoryPlannerError("no MRML scene given; pass the scene that holds the trajectories")
    sh = scene.GetSubjectHierarchyNode()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsLineNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLMarkupsLineNode")
        if node is line_node or node.GetAttribute(SHOWN_CANDIDATE_ATTRIBUTE) != "1":
            continue
        item = sh.GetItemByDataNode(node)
        plan_folder = sh.GetItemParent(item) if item else 0
        back = sh.GetItemChildWithName(plan_folder, CANDIDATE_FOLDER) if plan_folder else 0
        if back:
            sh.SetItemParent(item, back)
        for k in range(node.GetNumberOfDisplayNodes()):
            node.GetNthDisplayNode(k).SetVisibility(False)
        node.RemoveAttribute(SHOWN_CANDIDATE_ATTRIBUTE)
    if line_node is None or line_node.GetAttribute(ATTR_CANDIDATE) != "1":
        return
    item = sh.GetItemByDataNode(line_node)
    folder = sh.GetItemParent(item) if item else 0
    if folder and sh.GetItemName(folder) == CANDIDATE_FOLDER:
        sh.SetItemParent(item, sh.GetItemParent(folder))
    line_node.CreateDefaultDisplayNodes()
    for k in range(line_node.GetNumberOfDisplayNodes()):
        line_node.GetNthDisplayNode(k).SetVisibility(True)
    line_node.SetAttribute(SHOWN_CANDIDATE_ATTRIBUTE, "1")


def trajectory_rows(result) -> tuple[list[str], list[list[str]]]:
    """(column titles, rows of text) of the trajectory table: name, length, angle, score, clearance per structure."""
    structures = sorted({k for t in result.trajectories for k in t.clearance_mm})
    columns = ["name", "length mm", "angle deg", "score"] + [f"{s} mm" for s in structures]
    rows = []
    for t in result.trajectories:
        values = [t.name, f"{t.length_mm:.1f}", f"{t.angle_to_axial_deg:.1f}", f"{t.score:.3f}"]
        values += [f"{t.clearance_mm.get(s, float('nan')):.1f} (>= {t.margin_mm.get(s, 0):g})" for s in structures]
        rows.append(values)
    return columns, rows


# ---------------------------------------------------------------------------------------------- views
def line_points(line_node) -> tuple[np.ndarray, np.ndarray]:
    """(entry, target) world RAS mm of a trajectory line node (point 0 entry, point 1 target)."""
    if line_node is None or line_node.GetNumberOfControlPoints() < 2:
        raise TrajectoryPlannerError("select a trajectory with an entry and a target point first")
    p0, p1 = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    line_node.GetNthControlPointPositionWorld(0, p0)
    line_node.GetNthControlPointPositionWorld(1, p1)
    return np.array(p0), np.array(p1)


def reslice_along_path(line_node, in_plane_slice_node, across_slice_node=None) -> dict:
    """Put ``in_plane_slice_node``'s plane through the whole path and ``across_slice_node``'s across it at the target.

    In-plane view: ``vtkMRMLSliceNode.SetSliceToRASByNTP`` with the normal perpendicular to the path (the RAS
    axis least aligned with the path, made perpendicular to it: an in-plane path is shown in its axial plane),
    the transverse axis along the path and the position at the path's middle, so entry and target both lie in
    the plane. Across view: normal along the path, centred on the target. Returns the normals (RAS unit).
    """
    entry, target = line_points(line_node)
    d = target - entry
    length = float(np.linalg.norm(d))
    if length < 1e-3:
        raise TrajectoryPlannerError("the trajectory's entry and target coincide; select a planned trajectory")
    d = d / length
    axis = np.eye(3)[int(np.argmin(np.abs(d)))]
    normal = axis - np.dot(axis, d) * d
    normal /= np.linalg.norm(normal)
    centre = 0.5 * (entry + target)
    in_plane_slice_node.SetSliceToRASByNTP(*normal, *d, *centre, 0)
    out = {"in_plane_normal": normal, "direction": d}
    if across_slice_node is not None:
        across_slice_node.SetSliceToRASByNTP(*d, *normal, *target, 0)
        out["across_normal"] = d
    return out


# ---------------------------------------------------------------------------------------------- buttons
def button_states(pn, have_result: bool = False, connected: bool = False) -> dict:
    """Which buttons are enabled for parameter node ``pn`` (STOP and EMERGENCY are never disabled)."""
    targets = bool(pn and pn.targets and pn.targets.GetNumberOfControlPoints())
    selected = bool(pn and pn.selectedTrajectory)
    return {"compute": bool(pn and pn.ctVolume) and targets, "reslice": selected, "phase": connected,
            "sendTarget": connected and selected, "stop": True, "emergency": True}


# ---------------------------------------------------------------------------------------------- robot panel glue
def robot_plan(result, transform_node):
    """RobotPlan with the best-ranked trajectory per target; the registration QA comes from the approved
    transform (Registration Fusion); without approval the QA is empty and the robot bridge refuses motion."""
    from TrajectoryPlannerLib.robot.protocol import RobotPlan

    best = {}
    for t in (result.trajectories if result is not None else []):
        if t.target not in best or t.rank < best[t.target].rank:
            best[t.target] = t
    qa = {}
    if transform_node is not None and transform_node.GetAttribute("SmartBiopsy.RegistrationApproved") == "true":
        qa = json.loads(transform_node.GetAttribute("SmartBiopsy.RegistrationQA") or "{}")
    return RobotPlan.from_dict({"trajectories": [
        {"name": name, "region": t.region, "entry_ras": list(t.entry_ras), "target_ras": list(t.target_ras)}
        for name, t in best.items()], "registration_qa": qa})


def calibrate_robot(scene, ct_node, model_name: str, targets_node=None, progress=None, should_cancel=None,
                    out_dir=None):
    """Robot-to-CT calibration from the robot's fiducial frame in ``ct_node``.

    Returns (CalibrationResult, transform node robot->CT, model node of the fitted frame under it); the nodes
    are added to ``scene`` and owned by the caller. The predicted error is checked at the targets' points.
    With ``out_dir`` the calibration files are written there too (calibration_qa.json and the picture
    always; calibration.json and robot_to_ct.tfm only when the QA passed). Raises CalibrationError (one
    sentence) when the frame is missing, partial, degenerate or ambiguous.
    """
    from SmartBiopsyCoreLib.dataio.volumes_mrml import ct_from_node
    from SmartBiopsyCoreLib.fiducial_frames.model import load_model
    from TrajectoryPlannerLib.calibration.frame_fit import calibrate_from_ct
    from TrajectoryPlannerLib.calibration.mrml import add_calibration_nodes

    if ct_node is None:
        raise TrajectoryPlannerError("Select the planning CT that shows the robot's fiducial frame.")
    targets = {}
    if targets_node is not None:
        for i in range(targets_node.GetNumberOfControlPoints()):
            p = [0.0, 0.0, 0.0]
            targets_node.GetNthControlPointPositionWorld(i, p)
            targets[targets_node.GetNthControlPointLabel(i) or f"T{i + 1}"] = p
    ct = ct_from_node(ct_node, "select the planning CT that shows the robot's fiducial frame")
    result = calibrate_from_ct(ct, load_model(model_name), targets,
                               progress=progress, should_cancel=should_cancel)
    tnode, mnode = add_calibration_nodes(scene, result)
    if out_dir is not None:
        from TrajectoryPlannerLib.calibration.calibration_file import write_calibration
        from TrajectoryPlannerLib.calibration.picture import write_calibration_picture

        write_calibration(result, out_dir)
        write_calibration_picture(ct, result, Path(out_dir) / "calibration.png")
    return result, tnode, mnode


def calibration_text(result) -> str:
    """One line per fiducial and the verdict, for the robot panel's messages."""
    qa = result.qa_dict()
    lines = [f"calibration {qa['model']}: {qa['fiducials_found']} fiducials, residual RMS {qa['residual_rms_mm']:.3f} mm, "
             f"QA {'PASSED' if qa['passed'] is True else 'FAILED'}"]
    lines += [f"  {k}: residual {v:.3f} mm" for k, v in qa["residual_mm_per_fiducial"].items()]
    lines += [f"  predicted error at {k}: {v:.2f} mm (95 %)" for k, v in qa["predicted_error_p95_mm_at_targets"].items()]
    lines += [f"  check {k} failed" for k, c in qa["checks"].items() if not c["passed"]]
    return "\n".join(lines)


def connect_robot(host: str, port: int, result, transform_node, log_path, calibration=None,
                  robot_frame_ct_by: str = ""):
    """Open a robot session (log in ``log_path``), load the plan and set the robot frame; the caller owns and
    closes the session.

    The robot frame is either ``calibration`` (a CalibrationResult whose QA passed, validated again by the
    robot bridge's reader) or the operator's explicit statement that the robot works in CT coordinates
    (``robot_frame_ct_by`` names who states it; logged). Neither: refused before connecting.
    """
    from TrajectoryPlannerLib.robot.calibration_io import calibration_from_dict
    from TrajectoryPlannerLib.robot.protocol import RobotSession

    plan_ = robot_plan(result, transform_node)
    if calibration is not None:
        plan_.use_calibration(calibration_from_dict(calibration.to_dict(), "the robot calibration"))
    elif str(robot_frame_ct_by or "").strip():
        plan_.state_robot_frame_ct(robot_frame_ct_by)
    else:
        raise RobotBridgeError("There is no robot calibration: calibrate the robot from the CT (its QA must pass) "
                               "or state that the robot works in CT coordinates.")
    session = RobotSession(host, int(port), log_path=str(log_path))
    session.connect()
    session.load_plan(plan_)
    return session


def shutdown_robot(session) -> bool:
    """Close the session, sending STOP first (acknowledgement awaited, bounded) when motion may be in progress.
    For module exit and scene close; never raises. True when there was nothing to stop or STOP was
    acknowledged."""
    if session is None:
        return True
    moving = bool(getattr(session, "motion_possible", False))
    acknowledged = session.emergency_stop(2.0) if moving else True
    session.close(stop_if_moving=False)
    return bool(acknowledged)


def robot_connected(session) -> bool:
    return session is not None and bool(session.client.connected)


def confirm_plan(session, operator) -> None:
    session.confirm_plan(operator or "operator")


def robot_command(session, phase: str, confirm: bool = False):
    if phase == "CALIBRATION":
        session.calibrate()
        return session.last_status.get("CALIBRATION")
    return session.command(phase, confirm=confirm)


def send_target(session, name: str):
    return session.send_target(name, confirm=True)


def robot_stop(session) -> bool:
    """STOP now (a new message id, reconnecting once if needed, acknowledgement awaited at most 2 s)."""
    if session is None:
        raise RobotBridgeError("No robot session is connected; stop the robot at its own console.")
    if not session.emergency_stop(2.0):
        raise RobotBridgeError("STOP was sent but the robot did not acknowledge it within 2 s; stop the robot at "
                               "its own console.")
    return True


def robot_emergency(session):
    if session is None:
        raise RobotBridgeError("No robot session is connected; use the robot's own emergency stop.")
    return session.emergency()


def robot_status_text(session) -> str:
    if not session.client.connected:
        return "disconnected"
    states = ", ".join(f"{t.name}: {t.state}" for t in (session.plan.targets if session.plan else []))
    last = ", ".join(f"{k} {v.status_string or 'OK'}" for k, v in session.last_status.items())
    return f"connected; {states}; {last}"


def take_rejections(session) -> list:
    out = [m.status_string for m in session.rejections_reported]
    session.rejections_reported.clear()
    return out

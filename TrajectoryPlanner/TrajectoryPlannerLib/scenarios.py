"""Self-test scenarios of the TrajectoryPlanner module (shared by Slicer's self-test and headless pytest).

Each ``scenario_*(scene) -> dict`` builds small synthetic data, runs the Lib functions the module's Logic
calls on the given MRML scene, asserts the results and returns the measured numbers. Units: RAS mm,
degrees, HU. The robot scenario talks to the project's robot simulator over loopback (127.0.0.1).
"""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def _distance_maps(labels, risk_labels: dict) -> dict:
    """Euclidean distance (mm) of every voxel centre to each labelled structure's voxel centres."""
    from scipy import ndimage

    lab = np.asarray(labels.array)
    return {name: ndimage.distance_transform_edt(lab != value, sampling=labels.spacing[::-1])
            for value, name in risk_labels.items() if np.any(lab == value)}


def _independent_clearance(labels, dist_maps: dict, entry, tip, step_mm: float = 0.25) -> dict:
    """Smallest distance (mm) from the densely sampled straight path to each structure (nearest voxel)."""
    n = max(2, int(np.ceil(np.linalg.norm(np.subtract(tip, entry)) / step_mm)) + 1)
    pts = np.linspace(entry, tip, n)
    kji = np.round(labels.ras_to_ijk_points(pts)[:, ::-1]).astype(int)
    kji = np.clip(kji, 0, np.array(labels.array.shape) - 1)
    return {name: float(d[tuple(kji.T)].min()) for name, d in dist_maps.items()}


def scenario_plan_three_targets(scene) -> dict:
    """Three targets in a synthetic abdomen: ranked safe paths per target, each clearing every risk
    structure by its margin (checked by an independent dense ray-march on the label map), within the
    needle's reach, and the CT and structures loaded into the scene."""
    from TrajectoryPlannerLib.planning import engine, needles
    from SmartBiopsyCoreLib.phantom import abdomen as synthetic
    ct, labels, targets = synthetic.make_abdomen(spacing=(2.0, 2.0, 3.0))
    ct_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Planning CT")
    needle = needles.get_needle(needles.DEFAULT_NEEDLE)
    settings = engine.PlanSettings(top_n=2)
    steps = []
    result = engine.plan(ct, targets, needle, labelmaps=[(labels, synthetic.RISK_LABELS)], settings=settings,
                         progress=lambda f, msg: steps.append(f))
    assert steps and steps[-1] <= 1.0, "no progress reported"
    per_target = {}
    for t in result.trajectories:
        per_target.setdefault(t.target, []).append(t)
    assert sorted(per_target) == sorted(x["name"] for x in targets), f"targets without a path: {per_target.keys()}"
    voxel_half_diagonal = 0.5 * float(np.linalg.norm(labels.spacing))
    worst_excess = np.inf
    dist_maps = _distance_maps(labels, synthetic.RISK_LABELS)
    for t in result.trajectories:
        assert t.length_mm <= needle.max_reach_mm + 1e-6, f"{t.name} needs {t.length_mm:.1f} mm"
        assert t.angle_to_axial_deg <= settings.max_angle_deg + 1e-6
        tip = t.tip_ras if t.tip_ras is not None else t.target_ras
        dense = _independent_clearance(labels, dist_maps, t.entry_ras, tip)
        for name, d in dense.items():
            margin = t.margin_mm.get(name, 0.0)
            excess = d - needle.outer_radius_mm - margin
            worst_excess = min(worst_excess, excess)
            assert excess >= -voxel_half_diagonal, f"{t.name} passes {d:.1f} mm from {name} (margin {margin} mm)"
    ranks = {k: [t.score for t in sorted(v, key=lambda x: x.rank)] for k, v in per_target.items()}
    assert all(s == sorted(s, reverse=True) for s in ranks.values()), f"ranking not by score: {ranks}"
    assert ct_node.GetScene() is scene
    return {"trajectories": len(result.trajectories), "worst_margin_excess_mm": float(worst_excess),
            "shared_entry": result.shared_entry is not None, "rejections": result.rejections}


def scenario_rejects_target_in_bone(scene) -> dict:
    """A target placed inside bone (the spine) is refused with a message a radiologist can act on."""
    from TrajectoryPlannerLib.planning import engine
    from SmartBiopsyCoreLib.phantom import abdomen as synthetic
    from TrajectoryPlannerLib.errors import TrajectoryPlannerError

    ct, labels, _ = synthetic.make_abdomen(spacing=(3.0, 3.0, 4.0))
    deep = [{"name": "spine", "region": "A", "point_ras": [0.0, -75.0, 0.0]}]
    try:
        engine.plan(ct, deep, labelmaps=[(labels, synthetic.RISK_LABELS)], settings=engine.PlanSettings(top_n=1))
    except TrajectoryPlannerError as exc:
        message = str(exc)
    else:
        raise AssertionError("a target inside bone got a path")
    assert "spine" in message and "bone" in message, message
    return {"message": message}


def scenario_robot_safety(scene) -> dict:
    """Robot session against the simulator: targets are refused until the plan is confirmed and QA
    passed; after confirmation a target is sent and echoed within tolerance; STOP is always accepted."""
    from TrajectoryPlannerLib.errors import RobotBridgeError
    from TrajectoryPlannerLib.robot.protocol import RobotPlan, RobotSession
    from TrajectoryPlannerLib.robot.simulator import RobotSimulator

    plan = RobotPlan.from_dict({"trajectories": [
        {"name": "A", "region": "A", "entry_ras": [-140.0, 40.0, 10.0], "target_ras": [-78.0, 26.0, 6.0]},
        {"name": "B", "region": "B", "entry_ras": [-130.0, 60.0, -10.0], "target_ras": [-64.0, 16.0, -6.0]}],
        "registration_qa": {"passed": False}})
    sim = RobotSimulator(port=0, speed_mm_s=2000.0).start()
    session = RobotSession("127.0.0.1", sim.port, ack_timeout_s=1.0, status_timeout_s=3.0, motion_timeout_s=10.0)
    refusals = []
    try:
        session.connect()
        session.load_plan(plan)
        for attempt in ("unconfirmed", "qa-failed"):
            try:
                session.send_target("A", confirm=True)
            except RobotBridgeError as exc:
                refusals.append(str(exc))
            else:
                raise AssertionError(f"target sent while {attempt}")
            if attempt == "unconfirmed":
                session.confirm_plan("self-test")
        assert "confirm" in refusals[0] and "QA" in refusals[1], refusals
        assert session.stop().ok, "STOP was not accepted"
        session.set_registration_qa({"passed": True, "failures": [], "thresholds": {"max_predicted_tre_mm": 3.0},
                                     "targets": [{"name": "A", "predicted_tre_mm": 0.8},
                                                 {"name": "B", "predicted_tre_mm": 0.9}]})
        session.state_robot_frame_ct("self-test (simulated robot in CT coordinates)")
        session.command("START_UP")
        session.calibrate()
        session.command("PLANNING")
        session.command("TARGETING", confirm=True)
        t = session.send_target("A", confirm=True)
        assert t.state == "reachable", t.to_dict()
        assert t.echo_error_mm is not None and t.echo_error_mm <= session.tolerance_mm
        assert session.emergency().ok, "EMERGENCY was not accepted"
    finally:
        session.close()
        sim.stop()
    return {"refusals": refusals, "echo_error_mm": float(t.echo_error_mm), "state": t.state}


def risk_segmentation_case(scene, ct, labels, hidden=()):
    """The abdomen phantom as the panel sees it: a CT volume node and a risk segmentation with one segment per
    risk label (named after it, in label order), the ``hidden`` ones switched off. Returns (ct node, seg node)."""
    import slicer

    from SmartBiopsyCoreLib.dataio.volumes_mrml import add_volume_node
    from SmartBiopsyCoreLib.phantom.abdomen import RISK_LABELS

    ct_node = add_volume_node(scene, ct, "CT")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Risk structures")
    seg_node.CreateDefaultDisplayNodes()
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    seg = seg_node.GetSegmentation()
    lab = np.asarray(labels.array)
    for value, name in RISK_LABELS.items():
        one = add_volume_node(scene, labels.with_array((lab == value).astype(np.uint8)), f"label {name}", label=True)
        before = seg.GetNumberOfSegments()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(one, seg_node)
        scene.RemoveNode(one)
        assert seg.GetNumberOfSegments() == before + 1, f"label {name} did not become one segment"
        seg.GetNthSegment(before).SetName(name)
    display = seg_node.GetDisplayNode()
    for i in range(seg.GetNumberOfSegments()):
        sid = seg.GetNthSegmentID(i)
        display.SetSegmentVisibility(sid, seg.GetSegment(sid).GetName() not in hidden)
    return ct_node, seg_node


def scenario_logic_hidden_segments_and_reslice(scene) -> dict:
    """The panel's logic (the API the widget calls): a hidden risk segment is exported under its own name (never
    another segment's), and "Reslice along path" puts entry and target in the in-plane view."""
    from SmartBiopsyCoreLib.phantom import abdomen
    from TrajectoryPlannerLib import logic

    ct, labels, _ = abdomen.make_abdomen(spacing=(3.0, 3.0, 4.0))
    ct_node, seg_node = risk_segmentation_case(scene, ct, labels, hidden=("aorta",))
    maps = logic.user_labelmaps(scene, seg_node, ct_node)
    lab = np.asarray(labels.array)
    for (vol, names), (value, name) in zip(maps, abdomen.RISK_LABELS.items()):
        assert names == {1: name}, f"segment {name} exported as {names}"
        assert np.array_equal(np.asarray(vol.array) != 0, lab == value), f"segment {name} exported mislabelled"
    line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "A-1")
    entry, target = np.array([-120.0, 110.0, 45.0]), np.array([-70.0, 20.0, 0.0])
    line.AddControlPoint(entry.tolist(), "entry")
    line.AddControlPoint(target.tolist(), "A")
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Reslice check")
    logic.reslice_along_path(line, view)
    m = view.GetSliceToRAS()
    normal = np.array([m.GetElement(i, 2) for i in range(3)])
    origin = np.array([m.GetElement(i, 3) for i in range(3)])
    off = max(abs(float(np.dot(p - origin, normal))) for p in (entry, target))
    assert off < 0.5, f"the resliced plane is {off:.2f} mm from the path"
    return {"segments": len(maps), "reslice_off_plane_mm": off}


SCENARIOS = {
    "plan_three_targets": scenario_plan_three_targets,
    "rejects_target_in_bone": scenario_rejects_target_in_bone,
    "robot_safety": scenario_robot_safety,
    "logic_hidden_segments_and_reslice": scenario_logic_hidden_segments_and_reslice,
}

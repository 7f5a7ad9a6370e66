"""Self-test scenarios of the RegistrationFusion module (shared by Slicer's self-test and headless pytest).

Each ``scenario_*(scene) -> dict`` builds small synthetic data, runs the same Lib functions the module's
Logic calls (core algorithms and MRML glue) on the given MRML scene, asserts the results and returns the
measured numbers. The scene may be ``slicer.mrmlScene`` inside Slicer or a headless scene from
``SmartBiopsyCoreLib.runtime.new_scene``. Units: RAS mm; transforms are 4x4 RAS matrices mapping MRI-world
points to CT-world points.
"""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def _rotation(axis, angle_deg: float) -> np.ndarray:
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = np.radians(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def synthetic_capsule_layout(seed: int = 0, noise_mm: float = 0.2):
    """Two craniocaudal lines of capsules on the anterior skin, CT RAS (mm), and the same capsules seen in
    the MRI (shuffled, moved by a known rigid pose change, with localisation noise).

    Returns (ct_points (N,3), mri_points (N,3), mri_to_ct 4x4, order) where ``order[i]`` is the CT index of
    MRI capsule i.
    """
    rng = np.random.default_rng(seed)
    ct = np.array([[-60.0, 110.0, z] for z in (-60.0, -20.0, 20.0, 60.0)]
                  + [[20.0, 118.0, z] for z in (-45.0, 0.0, 45.0)])
    ct[:, 1] += rng.normal(0.0, 2.0, len(ct))  # curved skin
    mri_to_ct = np.eye(4)
    mri_to_ct[:3, :3] = _rotation((0.2, 0.1, 1.0), 7.0)
    mri_to_ct[:3, 3] = (12.0, -25.0, 40.0)
    ct_to_mri = np.linalg.inv(mri_to_ct)
    order = rng.permutation(len(ct))
    mri = (ct_to_mri[:3, :3] @ ct[order].T).T + ct_to_mri[:3, 3]
    mri = mri + rng.normal(0.0, noise_mm, mri.shape)
    return ct, mri, mri_to_ct, order


def scenario_landmark_registration(scene) -> dict:
    """Unordered capsule sets are matched and registered; the transform node puts the MRI capsules on the
    CT capsules; QA passes and predicts a small TRE at a deep target."""
    from RegistrationFusionLib.registration import landmarks, qa, mrml as registration_mrml
    ct, mri, truth, order = synthetic_capsule_layout(seed=1)
    corr, reg = landmarks.register_capsules(ct, mri)
    pairs = dict(corr.pairs)
    assert all(pairs[int(order[m])] == m for m in range(len(order))), f"wrong capsule pairing {corr.pairs}"
    target_ct = np.array([-20.0, 40.0, 0.0])  # about 7 cm under the skin
    true_mri = (np.linalg.inv(truth) @ np.append(target_ct, 1.0))[:3]
    tre = float(np.linalg.norm(landmarks.apply_transform(reg.matrix, true_mri[None])[0] - target_ct))
    report = qa.build_report(reg, {"Target A": target_ct}, correspondence=corr)
    assert report.passed, f"QA failed: {report.failures}"
    predicted = report.targets[0].predicted_tre_mm
    assert 0.0 < predicted < 2.0, f"predicted TRE {predicted} mm out of the plausible range"
    assert tre < 1.0, f"TRE {tre:.2f} mm at the target"

    mri_volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MRI T2")
    nodes = registration_mrml.apply_registration(scene, reg.matrix, [mri_volume], capsules_ct=ct[corr.fixed_indices],
                                                 capsules_mri=mri[corr.moving_indices])
    tnode = nodes["transform"]
    assert mri_volume.GetParentTransformNode() is tnode, "the MRI volume is not under the registration transform"
    m = registration_mrml.matrix_from_transform_node(tnode)
    assert np.allclose(m, reg.matrix, atol=1e-9), "transform node does not hold the registration matrix"
    mri_node, ct_node = nodes["capsules_mri"], nodes["capsules_ct"]
    assert mri_node.GetNumberOfControlPoints() == ct_node.GetNumberOfControlPoints() == len(ct)
    gaps = []
    for i in range(mri_node.GetNumberOfControlPoints()):
        a, b = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
        mri_node.GetNthControlPointPositionWorld(i, a)
        ct_node.GetNthControlPointPositionWorld(i, b)
        gaps.append(float(np.linalg.norm(np.subtract(a, b))))
    assert max(gaps) < 3 * reg.fre_mm + 0.5, f"MRI capsules do not overlay the CT capsules: {gaps}"
    return {"fre_mm": float(reg.fre_mm), "tre_mm": tre, "predicted_tre_mm": float(predicted),
            "max_capsule_gap_mm": max(gaps), "qa_passed": bool(report.passed)}


def scenario_outlier_exclusion(scene) -> dict:
    """A capsule that moved between the scans is excluded automatically with the reason; switching a
    capsule off by hand (the QA table's toggle) re-registers without it."""
    from RegistrationFusionLib.registration import landmarks, qa, mrml as registration_mrml
    ct, mri, truth, order = synthetic_capsule_layout(seed=2, noise_mm=0.15)
    mri = mri.copy()
    bad_mri = 3
    mri[bad_mri] += np.array([6.0, 0.0, 3.0])  # skin shift under one capsule
    corr, reg = landmarks.register_capsules(ct, mri)
    bad_pair = [i for i, (_, m) in enumerate(corr.pairs) if m == bad_mri][0]
    excluded = [e.pair_index for e in reg.excluded]
    assert excluded == [bad_pair], f"expected pair {bad_pair} excluded, got {excluded}"
    assert "excluded" in reg.excluded[0].reason and "mm" in reg.excluded[0].reason
    assert reg.fre_mm < 1.0, f"FRE {reg.fre_mm:.2f} mm after exclusion"

    # manual toggle: the user also switches off pair 0
    keep = [i for i in range(len(corr.pairs)) if i not in (bad_pair, 0)]
    f = ct[corr.fixed_indices][keep]
    m = mri[corr.moving_indices][keep]
    manual = landmarks.register_points(f, m, exclude_outliers=False)
    assert len(manual.used) == len(keep)
    report = qa.build_report(manual, np.array([[-20.0, 40.0, 0.0]]))
    tnode = registration_mrml.create_transform_node(scene, manual.matrix)
    delta = np.linalg.norm(registration_mrml.matrix_from_transform_node(tnode)[:3, 3] - truth[:3, 3])
    assert delta < 2.0, f"translation off by {delta:.2f} mm"
    return {"auto_excluded": excluded, "fre_auto_mm": float(reg.fre_mm), "fre_manual_mm": float(manual.fre_mm),
            "markers_manual": int(len(manual.used)), "qa_passed_manual": bool(report.passed)}


def scenario_rejects_collinear_capsules(scene) -> dict:
    """Capsules on one line cannot fix the rotation about it: registration is refused with that reason,
    and no transform node is created."""
    from RegistrationFusionLib.registration import landmarks
    from RegistrationFusionLib.registration.landmarks import DegenerateLayoutError

    n_before = scene.GetNumberOfNodesByClass("vtkMRMLLinearTransformNode")
    ct = np.array([[0.0, 100.0, z] for z in (-60.0, -20.0, 20.0, 60.0)])
    mri = ct + np.array([5.0, -3.0, 10.0])
    try:
        landmarks.register_capsules(ct, mri)
    except DegenerateLayoutError as exc:
        message = str(exc)
    else:
        raise AssertionError("collinear capsules were accepted")
    assert "line" in message and "second line" in message, message
    assert scene.GetNumberOfNodesByClass("vtkMRMLLinearTransformNode") == n_before
    return {"message": message}


def reregistration_case(scene, seed: int = 3):
    """Nodes the panel would hold after capsule detection: CT capsules (CT world), MRI capsules (MRI world) and
    an MRI volume, all in ``scene``; returns (ct node, mri capsules node, mri volume node, truth 4x4)."""
    from RegistrationFusionLib.registration import mrml as registration_mrml

    ct, mri, truth, _ = synthetic_capsule_layout(seed=seed, noise_mm=0.2)
    ct_node = registration_mrml.create_capsule_fiducials(scene, ct, "Capsules CT")
    mri_node = registration_mrml.create_capsule_fiducials(scene, mri, "Capsules MRI")
    mri_volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MRI T2")
    return ct_node, mri_node, mri_volume, truth


def scenario_logic_reregistration(scene) -> dict:
    """The panel's logic (the API the widget calls): registering twice, or after unticking a capsule pair,
    equals registering from scratch (within 0.01 mm), although the MRI capsules now sit under the transform."""
    from RegistrationFusionLib.logic import FusionLogic
    from RegistrationFusionLib.registration import mrml as registration_mrml

    probe = np.array([[-20.0, 40.0, 0.0], [60.0, -40.0, 80.0], [-90.0, 120.0, -70.0]])

    def moved(m):
        return probe @ m[:3, :3].T + m[:3, 3]

    ct_node, mri_node, mri_volume, truth = reregistration_case(scene)
    logic = FusionLogic(scene)
    tnode = logic.register(ct_node, mri_node, mri_volume)
    first = registration_mrml.matrix_from_transform_node(tnode)
    assert mri_node.GetParentTransformNode() is tnode and mri_volume.GetParentTransformNode() is tnode
    logic.register(ct_node, mri_node, mri_volume, tnode)  # "Register" clicked again
    again = registration_mrml.matrix_from_transform_node(tnode)
    twice_mm = float(np.abs(moved(again) - moved(first)).max())
    assert twice_mm < 0.01, f"registering again moved the result by {twice_mm:.3f} mm"

    logic.set_pair_used(1, False, ct_node, mri_node, mri_volume, tnode)  # untick pair 1 in the QA table
    unticked = registration_mrml.matrix_from_transform_node(tnode)
    fresh_logic = FusionLogic(scene)
    c2, m2, v2, _ = reregistration_case(scene)
    fresh = registration_mrml.matrix_from_transform_node(fresh_logic.register(c2, m2, v2, excluded_pairs={1}))
    untick_mm = float(np.abs(moved(unticked) - moved(fresh)).max())
    assert untick_mm < 0.01, f"unticking a pair differs from registering without it by {untick_mm:.3f} mm"
    truth_mm = float(np.linalg.norm(moved(first) - moved(truth), axis=1).max())
    assert truth_mm < 2.0, f"registration {truth_mm:.2f} mm from the truth"
    return {"twice_mm": twice_mm, "untick_mm": untick_mm, "truth_mm": truth_mm}


SCENARIOS = {
    "landmark_registration": scenario_landmark_registration,
    "outlier_exclusion": scenario_outlier_exclusion,
    "rejects_collinear_capsules": scenario_rejects_collinear_capsules,
    "logic_reregistration": scenario_logic_reregistration,
}

"""Registration MRML glue on a real headless scene: transform node, capsule fiducials, MRI under the transform."""
from __future__ import annotations

import numpy as np
import pytest

from RegistrationFusionLib.registration import mrml as rm
from RegistrationFusionLib.errors import RegistrationFusionError
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from RegistrationFusionLib.registration.landmarks import apply_transform, fit_transform


@pytest.fixture
def scene():
    try:
        from SmartBiopsyCoreLib.runtime import new_scene
        return new_scene()
    except ImportError:
        import slicer
        return slicer.vtkMRMLScene()


def _rigid():
    a = np.radians(14.0)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    m[:3, 3] = [4.0, -12.5, 30.0]
    return m


def _world(node, i):
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(i, p)
    return np.array(p)


def test_transform_node_holds_mri_to_ct_as_transform_to_parent(scene):
    import vtk
    m = _rigid()
    node = rm.create_transform_node(scene, m)
    assert node.IsA("vtkMRMLLinearTransformNode") and node.GetScene() is scene
    assert np.allclose(rm.matrix_from_transform_node(node), m, atol=1e-12)
    # a point transformed to the world by the node goes where the matrix sends it
    out = node.GetTransformToParent().TransformPoint(5.0, 6.0, 7.0)
    assert np.allclose(out, apply_transform(m, [5.0, 6.0, 7.0]))
    m2 = np.eye(4); m2[:3, 3] = [1, 2, 3]
    assert rm.create_transform_node(scene, m2, node=node) is node
    assert np.allclose(rm.matrix_from_transform_node(node), m2)


def test_mri_capsules_under_transform_overlay_ct_capsules(scene):
    m = _rigid()
    ct_caps = np.array([[-30, 100, -20], [-30, 100, 20], [30, 100, -27], [30, 100, 13.0]])
    mri_caps = apply_transform(np.linalg.inv(m), ct_caps)
    vol = RasVolume(np.zeros((4, 5, 6), np.float32), make_grid((0, 0, 0), (1, 1, 2), (4, 5, 6)), "t2")
    try:
        from SmartBiopsyCoreLib.dataio.volumes_mrml import add_volume_node
        vnode = add_volume_node(scene, vol)
    except ImportError:
        vnode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "t2")
    nodes = rm.apply_registration(scene, m, [vnode], capsules_ct=ct_caps, capsules_mri=mri_caps,
                                  capsule_labels_ct=["C1", "C2", "C3", "C4"])
    t = nodes["transform"]
    assert vnode.GetParentTransformNode() is t
    assert nodes["capsules_mri"].GetParentTransformNode() is t
    assert nodes["capsules_ct"].GetParentTransformNode() is None
    assert nodes["capsules_ct"].GetNumberOfControlPoints() == 4
    assert nodes["capsules_ct"].GetNthControlPointLabel(2) == "C3"
    assert nodes["capsules_ct"].GetLocked()
    for i in range(4):
        assert np.allclose(_world(nodes["capsules_mri"], i), ct_caps[i], atol=1e-6)
        assert np.allclose(_world(nodes["capsules_ct"], i), ct_caps[i], atol=1e-6)
        local = [0.0, 0.0, 0.0]
        nodes["capsules_mri"].GetNthControlPointPosition(i, local)
        assert np.allclose(local, mri_caps[i], atol=1e-6)


def test_landmark_result_round_trips_through_the_scene(scene):
    rng = np.random.default_rng(1)
    ct = rng.uniform(-50, 50, (6, 3))
    m = _rigid()
    est = fit_transform(apply_transform(np.linalg.inv(m), ct), ct)
    node = rm.create_transform_node(scene, est)
    assert np.allclose(rm.matrix_from_transform_node(node), m, atol=1e-9)


def test_rejects_invalid_matrix_and_points(scene):
    with pytest.raises(RegistrationFusionError, match="4x4"):
        rm.create_transform_node(scene, np.eye(3))
    with pytest.raises(RegistrationFusionError, match="invalid numbers"):
        rm.create_capsule_fiducials(scene, np.array([[0, 0, np.nan]]), "bad")

"""Capsule detections as a markups point list on a real headless MRML scene."""
from __future__ import annotations

import json

import numpy as np
import pytest

from RegistrationFusionLib.capsules.detection import CapsuleDetection
from RegistrationFusionLib.capsules.mrml import add_capsule_fiducials, capsule_points_from_node
from RegistrationFusionLib.errors import RegistrationFusionError


def _detection(n=4):
    rng = np.random.default_rng(3)
    centres = rng.uniform(-100, 100, (n, 3))
    return CapsuleDetection(
        modality="ct", image_name="CT", centres_ras=centres, confidence=np.linspace(0.9, 0.6, n),
        fle_mm=np.full((n, 3), 0.05), sizes_mm=np.tile([10.0, 5.0, 5.0], (n, 1)),
        fle_cov_ras=np.repeat(np.eye(3)[None] * 0.0025, n, axis=0), axes_ras=np.tile([0, 0, 1.0], (n, 1)),
        labels=[f"C{i + 1}" for i in range(n)])


def test_fiducial_node_holds_one_labelled_point_per_capsule(scene):
    det = _detection()
    node = add_capsule_fiducials(scene, det, "CT capsules")
    assert node.IsA("vtkMRMLMarkupsFiducialNode")
    assert scene.GetNodeByID(node.GetID()) is node
    assert node.GetNumberOfControlPoints() == len(det)
    assert np.allclose(capsule_points_from_node(node), det.centres_ras, atol=1e-6)
    for i in range(len(det)):
        assert node.GetNthControlPointLabel(i) == f"C{i + 1}"
        desc = node.GetNthControlPointDescription(i)
        assert f"confidence={det.confidence[i]:.2f}" in desc
        assert node.GetNthControlPointLocked(i)
    assert node.GetDisplayNode() is not None
    info = json.loads(node.GetAttribute("SmartBiopsy.CapsuleDetection"))
    assert info["count"] == len(det)


def test_second_node_gets_unique_name(scene):
    a = add_capsule_fiducials(scene, _detection(3), "Capsules")
    b = add_capsule_fiducials(scene, _detection(3), "Capsules")
    assert a.GetName() != b.GetName()


def test_missing_scene_is_refused():
    with pytest.raises(RegistrationFusionError, match="scene"):
        add_capsule_fiducials(None, _detection(3))

"""MRML glue for capsule detection: detected capsules as a markups fiducial (point list) node.

Takes the scene explicitly and returns the node it creates (owned by the scene); never uses
``slicer.mrmlScene``, ``slicer.app`` or qt.
"""
from __future__ import annotations

import logging

import numpy as np

from RegistrationFusionLib.capsules.detection import CapsuleDetection
from RegistrationFusionLib.errors import RegistrationFusionError
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)


def add_capsule_fiducials(scene, detection: CapsuleDetection, name: str = "Capsules", *, locked: bool = True):
    """Add one control point per detected capsule to a new ``vtkMRMLMarkupsFiducialNode`` in ``scene``.

    Points are RAS mm (world; the node has no parent transform). Labels are C1..CN (the detection's
    order); each point's description holds its confidence, per-axis FLE (mm, R/A/S) and size as
    ``confidence=0.97; fle_mm=0.05,0.05,0.04; size_mm=10.0x5.3x5.1``. The node's attribute
    ``SmartBiopsy.CapsuleDetection`` carries the detection's JSON (without the rejected list).
    Returns the new node.
    """
    if scene is None:
        raise RegistrationFusionError("no MRML scene was given to hold the capsule markers")
    centres = np.asarray(detection.centres_ras, float).reshape(-1, 3)
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    was = node.StartModify()
    try:
        for i, p in enumerate(centres):
            label = detection.labels[i] if i < len(detection.labels) else f"C{i + 1}"
            idx = node.AddControlPoint([float(p[0]), float(p[1]), float(p[2])], label)
            fle = detection.fle_mm[i]
            size = detection.sizes_mm[i]
            node.SetNthControlPointDescription(
                idx, f"confidence={float(detection.confidence[i]):.2f}; "
                     f"fle_mm={fle[0]:.2f},{fle[1]:.2f},{fle[2]:.2f}; "
                     f"size_mm={size[0]:.1f}x{size[1]:.1f}x{size[2]:.1f}")
            node.SetNthControlPointLocked(idx, bool(locked))
        summary = detection.to_dict()
        summary.pop("rejected", None)
        node.SetAttribute("SmartBiopsy.CapsuleDetection", jsonio.dumps(summary))
        node.SetAttribute("SmartBiopsy.Modality", detection.modality)
    finally:
        node.EndModify(was)
    logger.info("capsule markers '%s': %d points", node.GetName(), node.GetNumberOfControlPoints())
    return node


def capsule_points_from_node(node) -> np.ndarray:
    """World RAS positions (N, 3) mm of a point-list node's control points (for edited marker lists)."""
    n = node.GetNumberOfControlPoints()
    out = np.zeros((n, 3))
    for i in range(n):
        node.GetNthControlPointPositionWorld(i, out[i])
    return out

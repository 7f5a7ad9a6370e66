"""MRML glue for the registration step: transform node, capsule fiducials, MRI volumes under the transform.

Every function takes the scene (or nodes) explicitly and returns the nodes it creates; the caller (the
module Logic, or a test with a headless scene) owns them. The registration is a 4x4 RAS matrix mapping
MRI-world points to CT-world points, stored as the "transform to parent" of a
``vtkMRMLLinearTransformNode``; MRI volumes (and MRI capsule fiducials) placed under that node are shown
in CT space.
"""
from __future__ import annotations

import logging

import numpy as np

from RegistrationFusionLib.errors import RegistrationFusionError
from SmartBiopsyCoreLib.geometry import array_from_vtk_matrix, vtk_matrix

logger = logging.getLogger(__name__)


def _vtk_matrix(m: np.ndarray):
    m = np.asarray(m, float)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise RegistrationFusionError("the registration is not a valid 4x4 matrix; run the registration again")
    return vtk_matrix(m)


def matrix_from_transform_node(node) -> np.ndarray:
    """4x4 RAS "transform to parent" of a linear transform node (MRI->CT for the registration node)."""
    import vtk

    vm = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(vm)
    return array_from_vtk_matrix(vm)


def create_transform_node(scene, mri_to_ct_ras: np.ndarray, name: str = "MRI to CT registration",
                          node=None):
    """A ``vtkMRMLLinearTransformNode`` whose transform-to-parent is the MRI->CT matrix (RAS).

    Pass ``node`` to update an existing transform node instead of creating one. Returns the node.
    """
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(_vtk_matrix(mri_to_ct_ras))
    return node


def create_capsule_fiducials(scene, points_ras: np.ndarray, name: str, labels: list[str] | None = None,
                             color: tuple[float, float, float] = (1.0, 0.8, 0.0), locked: bool = True,
                             descriptions: list[str] | None = None):
    """A markups fiducial node with one control point per capsule (RAS mm), locked so it is not moved by accident."""
    pts = np.asarray(points_ras, float).reshape(-1, 3)
    if not np.all(np.isfinite(pts)):
        raise RegistrationFusionError(f"capsule positions for '{name}' contain invalid numbers; re-run the detection")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    for i, p in enumerate(pts):
        idx = node.AddControlPointWorld(float(p[0]), float(p[1]), float(p[2]),
                                        labels[i] if labels and i < len(labels) else f"C{i + 1}")
        if descriptions and i < len(descriptions):
            node.SetNthControlPointDescription(idx, descriptions[i])
    node.SetLocked(bool(locked))
    disp = node.GetDisplayNode()
    if disp is not None:
        disp.SetSelectedColor(*color)
        disp.SetColor(*color)
    return node


def apply_registration(scene, mri_to_ct_ras: np.ndarray, mri_volume_nodes=(), *, capsules_ct=None, capsules_mri=None,
                       capsule_labels_ct=None, capsule_labels_mri=None, transform_node=None,
                       name: str = "MRI to CT registration") -> dict:
    """Create/update the registration transform and place the MRI volumes (and MRI capsules) under it.

    ``capsules_ct``: CT capsule centres (CT RAS), shown as they are; ``capsules_mri``: MRI capsule centres
    (MRI RAS), put under the transform so they overlay the CT capsules when the registration is right.
    Returns {"transform": node, "capsules_ct": node|None, "capsules_mri": node|None}.
    """
    tnode = create_transform_node(scene, mri_to_ct_ras, name, node=transform_node)
    for vnode in mri_volume_nodes:
        if vnode is None:
            continue
        if vnode.GetScene() is not scene:
            raise RegistrationFusionError(f"volume '{vnode.GetName()}' is not in this scene; load it first")
        vnode.SetAndObserveTransformNodeID(tnode.GetID())
    out = {"transform": tnode, "capsules_ct": None, "capsules_mri": None}
    if capsules_ct is not None:
        out["capsules_ct"] = create_capsule_fiducials(scene, capsules_ct, "Capsules CT", capsule_labels_ct,
                                                      color=(1.0, 0.8, 0.0))
    if capsules_mri is not None:
        n = create_capsule_fiducials(scene, capsules_mri, "Capsules MRI", capsule_labels_mri, color=(0.2, 0.8, 1.0))
        # points were given in MRI RAS: set them as local coordinates, then place under the transform
        pts = np.asarray(capsules_mri, float).reshape(-1, 3)
        for i, p in enumerate(pts):
            n.SetNthControlPointPosition(i, float(p[0]), float(p[1]), float(p[2]))
        n.SetAndObserveTransformNodeID(tnode.GetID())
        out["capsules_mri"] = n
    logger.info("registration applied to %d MRI volume(s)", sum(v is not None for v in mri_volume_nodes))
    return out

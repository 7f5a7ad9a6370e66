"""MRML glue for the sampling step: the detected needle and the notch ROI as display nodes.

Takes the scene explicitly and returns the nodes it creates (the caller owns them; they live in the
scene). No slicer.app / slicer.mrmlScene / qt. All coordinates are RAS mm in the confirmation-CT world;
nodes are created without a parent transform.
"""
from __future__ import annotations

import logging

import numpy as np

from SmartBiopsyCoreLib import palette
from SmartBiopsyCoreLib.geometry import vtk_matrix

from SmartBiopsyLib.sampling.needle import NeedleDetection
from SmartBiopsyLib.sampling.notch import NotchROI

logger = logging.getLogger(__name__)

#: Display colours (RGB 0-1) from the project palette: needle bluish green, notch (and planned notch tip) sky blue.
NEEDLE_COLOR = palette.NEEDLE_COLOUR
NOTCH_COLOR = palette.NOTCH_TIP_COLOUR


def _set_color(node, rgb) -> None:
    node.CreateDefaultDisplayNodes()
    disp = node.GetDisplayNode()
    if disp is not None:
        disp.SetSelectedColor(*rgb)
        disp.SetColor(*rgb)


def add_needle_line_node(scene, detection: NeedleDetection, name: str | None = None):
    """A ``vtkMRMLMarkupsLineNode`` from the most proximal needle point found to the detected tip.

    Control point 0 is labelled "shaft", control point 1 "tip"; node attributes carry the placement error
    (``SmartBiopsy.LateralErrorMm``, ``SmartBiopsy.DepthErrorMm``, ``SmartBiopsy.AngleDeg``). Returns the node.
    """
    import vtk

    label = detection.target_name or "needle"
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", name or f"Needle {label}")
    node.AddControlPointWorld(vtk.vtkVector3d(*[float(v) for v in detection.shaft_start_ras]), "shaft")
    node.AddControlPointWorld(vtk.vtkVector3d(*[float(v) for v in detection.tip_ras]), "tip")
    node.SetAttribute("SmartBiopsy.Target", detection.target_name or "")
    node.SetAttribute("SmartBiopsy.LateralErrorMm", f"{detection.lateral_error_mm:.3f}")
    node.SetAttribute("SmartBiopsy.DepthErrorMm", f"{detection.depth_error_mm:.3f}")
    node.SetAttribute("SmartBiopsy.AngleDeg", f"{detection.angle_deg:.3f}")
    node.SetLocked(True)
    _set_color(node, NEEDLE_COLOR)
    return node


def add_planned_line_node(scene, detection: NeedleDetection, name: str | None = None, region: str | None = None):
    """A ``vtkMRMLMarkupsLineNode`` from the planned entry to the planned needle tip, for comparison. Returns it.

    The detection's planned end point is where the plan puts the needle tip (the planned notch tip, beyond the
    target when the notch must cover it), so control point 1 is labelled "planned notch tip A", never "target".
    Coloured like the habitat ``region`` (palette) when given.
    """
    import vtk

    label = detection.target_name or "needle"
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", name or f"Planned path {label}")
    node.AddControlPointWorld(vtk.vtkVector3d(*[float(v) for v in detection.planned_entry_ras]), "entry")
    node.AddControlPointWorld(vtk.vtkVector3d(*[float(v) for v in detection.planned_target_ras]),
                              f"planned notch tip {label}")
    node.SetLocked(True)
    if region:
        _set_color(node, palette.region_colour(region))
    return node


def add_target_and_tip_node(scene, detection: NeedleDetection, target_ras, region: str | None = None,
                            name: str | None = None):
    """A fiducial node with two separate labelled points (RAS mm, CT world): "target A" (the habitat target)
    and "planned notch tip A" (the detection's planned tip). Coloured like the habitat ``region``. Returns it."""
    label = detection.target_name or "needle"
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name or f"Target and planned notch tip {label}")
    i = node.AddControlPoint(*[float(v) for v in target_ras], f"target {label}")
    node.SetNthControlPointDescription(i, "the habitat target")
    tip = np.asarray(detection.planned_target_ras, float)
    j = node.AddControlPoint(*[float(v) for v in tip], f"planned notch tip {label}")
    node.SetNthControlPointDescription(j, f"where the plan puts the needle tip, "
                                          f"{np.linalg.norm(tip - np.asarray(target_ras, float)):.1f} mm from the target")
    node.SetLocked(True)
    _set_color(node, palette.region_colour(region) if region else NOTCH_COLOR)
    return node


def add_notch_roi_node(scene, roi: NotchROI, name: str | None = None):
    """A ``vtkMRMLMarkupsROINode`` (box type) oriented with the needle: its z axis is the needle axis.

    Size = (2 x half width u, 2 x half width v, length) mm; for the tip-distal cylinder the node shows the
    bounding box (2r x 2r x length) and the attribute ``SmartBiopsy.Shape`` says "cylinder". Returns the node.
    """
    label = roi.target_name or "notch"
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name or f"Notch {label} ({roi.mode})")
    node.SetROIType(node.ROITypeBox)
    node.SetAndObserveObjectToNodeMatrix(vtk_matrix(roi.frame))
    hu, hv = roi.half_extent_mm
    node.SetSize(2.0 * hu, 2.0 * hv, float(roi.length_mm))
    node.SetAttribute("SmartBiopsy.Target", roi.target_name or "")
    node.SetAttribute("SmartBiopsy.NotchMode", roi.mode)
    node.SetAttribute("SmartBiopsy.Shape", roi.shape)
    node.SetLocked(True)
    _set_color(node, NOTCH_COLOR)
    return node


def roi_polydata(roi: NotchROI, resolution: int = 32):
    """Closed surface (vtkPolyData, RAS mm) of the ROI: oriented box or capped cylinder."""
    import vtk

    if roi.shape == "box":
        src = vtk.vtkCubeSource()
        hu, hv = roi.half_extent_mm
        src.SetXLength(2 * hu)
        src.SetYLength(2 * hv)
        src.SetZLength(roi.length_mm)
        local = np.eye(4)
    else:
        src = vtk.vtkCylinderSource()  # axis along y, centred at the origin
        src.SetRadius(roi.radius_mm)
        src.SetHeight(roi.length_mm)
        src.SetResolution(int(resolution))
        src.CappingOn()
        local = np.array([[1.0, 0, 0, 0], [0, 0, -1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])  # y -> z
    tri = vtk.vtkTriangleFilter()
    tri.SetInputConnection(src.GetOutputPort())
    tf = vtk.vtkTransform()
    tf.SetMatrix(vtk_matrix(roi.frame @ local))
    f = vtk.vtkTransformPolyDataFilter()
    f.SetInputConnection(tri.GetOutputPort())
    f.SetTransform(tf)
    f.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(f.GetOutput())
    return out


def add_notch_segmentation(scene, roi: NotchROI, name: str | None = None, segmentation_node=None):
    """Add the notch as a closed-surface segment (to ``segmentation_node`` or a new segmentation node).

    Returns ``(segmentation_node, segment_id)``.
    """
    label = roi.target_name or "notch"
    seg = segmentation_node
    if seg is None:
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or "Notch regions")
        seg.CreateDefaultDisplayNodes()
        seg.SetSourceRepresentationToClosedSurface()
    seg_id = seg.AddSegmentFromClosedSurfaceRepresentation(roi_polydata(roi), f"Notch {label}", list(NOTCH_COLOR))
    return seg, seg_id


def add_sampling_nodes(scene, detection: NeedleDetection, roi: NotchROI, segmentation: bool = False,
                       target_ras=None, region: str | None = None) -> dict:
    """All display nodes for one sampled target: needle line, planned line, notch ROI (and segment).

    Returns a dict of the created nodes: ``needle``, ``planned``, ``notch_roi``, with ``target_ras`` (CT RAS mm)
    also ``points`` (target and planned notch tip as separate points), and optionally ``segmentation`` /
    ``segment_id``.
    """
    out = {"needle": add_needle_line_node(scene, detection),
           "planned": add_planned_line_node(scene, detection, region=region),
           "notch_roi": add_notch_roi_node(scene, roi)}
    if target_ras is not None:
        out["points"] = add_target_and_tip_node(scene, detection, target_ras, region)
    if segmentation:
        out["segmentation"], out["segment_id"] = add_notch_segmentation(scene, roi)
    return out

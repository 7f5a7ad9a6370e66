"""Skin accessibility map: the body surface coloured by the best margin-aware clearance to the targets.

Like the Percutaneous Approach Analysis extension's skin colouring, but each skin point carries how far
(mm) the best safe straight path from that point to any target stays beyond every structure's safety
margin (0 where no safe path to any target starts there), plus how many targets are reachable from it.
Values come from the plan's evaluated candidate entries (nearest candidate within ``max_distance_mm``).

Geometry: the returned vtkPolyData is in RAS mm (as MRML model nodes hold it). :func:`write_skin_model`
writes files in LPS with Slicer's ``SPACE=LPS`` convention (converted with SmartBiopsyCoreLib.geometry).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from SmartBiopsyCoreLib.geometry import ras_to_lps_points

from TrajectoryPlannerLib.errors import TrajectoryPlannerError

logger = logging.getLogger(__name__)

CLEARANCE_ARRAY = "ClearanceMM"
REACHABLE_ARRAY = "TargetsReachable"


def skin_surface(body, decimate: float = 0.7, smooth_iterations: int = 0):
    """Decimated iso-surface (vtkPolyData, RAS mm) of a body mask RasVolume (uint8 or bool)."""
    import vtk
    from vtk.util import numpy_support

    arr = np.ascontiguousarray(np.asarray(body.array).astype(np.uint8))
    if not arr.any():
        raise TrajectoryPlannerError("the body mask is empty; no skin surface can be built")
    img = vtk.vtkImageData()
    img.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(arr.ravel(), deep=True))
    fe = vtk.vtkFlyingEdges3D()
    fe.SetInputData(img)
    fe.SetValue(0, 0.5)
    fe.ComputeNormalsOff()
    last = fe
    if decimate > 0:
        dec = vtk.vtkDecimatePro()
        dec.SetInputConnection(last.GetOutputPort())
        dec.SetTargetReduction(float(decimate))
        dec.PreserveTopologyOff()
        dec.SplittingOff()
        last = dec
    if smooth_iterations > 0:
        sm = vtk.vtkWindowedSincPolyDataFilter()
        sm.SetInputConnection(last.GetOutputPort())
        sm.SetNumberOfIterations(smooth_iterations)
        sm.SetPassBand(0.1)
        sm.NormalizeCoordinatesOn()
        last = sm
    tf = vtk.vtkTransform()
    tf.SetMatrix(np.asarray(body.ijk_to_ras, float).ravel().tolist())
    tp = vtk.vtkTransformPolyDataFilter()
    tp.SetInputConnection(last.GetOutputPort())
    tp.SetTransform(tf)
    nm = vtk.vtkPolyDataNormals()
    nm.SetInputConnection(tp.GetOutputPort())
    nm.SplittingOff()
    nm.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(nm.GetOutput())
    return out


def check_skin_data(result) -> None:
    """Raise :class:`TrajectoryPlannerError` when a :class:`PlanResult` holds no skin data for :func:`skin_model`."""
    if result.body is None or result.skin_points_ras is None or len(result.skin_points_ras) == 0:
        raise TrajectoryPlannerError("the plan holds no skin data; run the planner again before building the skin map")


def skin_model(result, decimate: float = 0.7, max_distance_mm: float | None = None):
    """Skin surface (vtkPolyData, RAS mm) of a :class:`PlanResult` with ClearanceMM/TargetsReachable arrays."""
    from scipy.spatial import cKDTree
    from vtk.util import numpy_support

    check_skin_data(result)
    poly = skin_surface(result.body, decimate)
    pts = numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(float)
    if max_distance_mm is None:
        max_distance_mm = 1.5 * result.settings.entry_spacing_mm + float(np.linalg.norm(result.body.spacing))
    d, idx = cKDTree(result.skin_points_ras).query(pts)
    near = d <= max_distance_mm
    clear = np.where(near, result.skin_clearance_mm[idx], 0.0).astype(np.float32)
    reach = np.where(near, result.skin_targets_reachable[idx], 0).astype(np.int16)
    for name, values in ((CLEARANCE_ARRAY, clear), (REACHABLE_ARRAY, reach)):
        a = numpy_support.numpy_to_vtk(values, deep=True)
        a.SetName(name)
        poly.GetPointData().AddArray(a)
    poly.GetPointData().SetActiveScalars(CLEARANCE_ARRAY)
    logger.info("skin map: %d points, %d accessible", len(pts), int((reach > 0).sum()))
    return poly


def write_skin_model(poly, path) -> str:
    """Write the skin model (.vtp or .vtk) in LPS with Slicer's SPACE=LPS convention; returns the path."""
    import vtk
    from vtk.util import numpy_support

    path = os.fspath(path)
    out = vtk.vtkPolyData()
    out.DeepCopy(poly)
    ras = numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(float)
    pts = vtk.vtkPoints()
    pts.SetData(numpy_support.numpy_to_vtk(ras_to_lps_points(ras), deep=True))
    out.SetPoints(pts)
    if out.GetPointData().GetNormals() is not None:  # normals flip with x and y as well
        n = numpy_support.vtk_to_numpy(out.GetPointData().GetNormals()).astype(np.float32)
        na = numpy_support.numpy_to_vtk(ras_to_lps_points(n).astype(np.float32), deep=True)
        na.SetName(out.GetPointData().GetNormals().GetName() or "Normals")
        out.GetPointData().SetNormals(na)
    if path.lower().endswith(".vtp"):
        w = vtk.vtkXMLPolyDataWriter()
        w.SetDataModeToBinary()
    elif path.lower().endswith(".vtk"):
        w = vtk.vtkPolyDataWriter()
        w.SetHeader("vtk output SPACE=LPS")
        w.SetFileTypeToBinary()
    else:
        raise TrajectoryPlannerError(f"cannot write the skin model to {os.path.basename(path)}: use .vtp or .vtk")
    # Slicer reads the coordinate system of XML models from this field-data string array.
    space = vtk.vtkStringArray()
    space.SetName("SPACE")
    space.InsertNextValue("LPS")
    out.GetFieldData().AddArray(space)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w.SetFileName(path)
    w.SetInputData(out)
    if not w.Write():
        raise TrajectoryPlannerError(f"could not write {path}; check the folder is writable and has space")
    return path

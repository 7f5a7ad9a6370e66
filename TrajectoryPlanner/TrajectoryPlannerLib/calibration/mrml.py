"""MRML glue for the robot calibration: the robot-to-CT transform node and the fitted frame as a model node.

Functions take the scene explicitly and return the nodes they create (the caller owns them). The model node
holds the frame in ROBOT coordinates and sits under the transform node, so Slicer shows it where it was
fitted in the CT; per-fiducial residuals are node attributes. No slicer.app / slicer.mrmlScene here.
"""
from __future__ import annotations

import numpy as np

from SmartBiopsyCoreLib.geometry import vtk_matrix
from TrajectoryPlannerLib.calibration.frame_fit import CalibrationResult
from TrajectoryPlannerLib.errors import TrajectoryPlannerError

ATTR = "TrajectoryPlanner.Calibration."


def frame_polydata(model, tube_sides: int = 12):
    """vtkPolyData of the frame model in the robot frame: tubes as cylinders, spheres as spheres (mm)."""
    import vtk

    append = vtk.vtkAppendPolyData()
    for t in model.tubes:
        line = vtk.vtkLineSource()
        line.SetPoint1(*t.start)
        line.SetPoint2(*t.end)
        tube = vtk.vtkTubeFilter()
        tube.SetInputConnection(line.GetOutputPort())
        tube.SetRadius(t.radius_mm)
        tube.SetNumberOfSides(tube_sides)
        tube.CappingOn()
        tube.Update()
        append.AddInputData(tube.GetOutput())
    for s in model.spheres:
        sph = vtk.vtkSphereSource()
        sph.SetCenter(*s.centre)
        sph.SetRadius(s.radius_mm)
        sph.SetThetaResolution(16)
        sph.SetPhiResolution(12)
        sph.Update()
        append.AddInputData(sph.GetOutput())
    append.Update()
    return append.GetOutput()


def add_calibration_nodes(scene, result: CalibrationResult, name: str = "Robot to CT"):
    """(transform node robot->CT RAS, model node of the fitted frame under it) added to ``scene``."""
    if scene is None:
        raise TrajectoryPlannerError("no MRML scene given; pass the scene that should hold the calibration")
    tnode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    tnode.SetMatrixTransformToParent(vtk_matrix(np.asarray(result.matrix_robot_to_ct_ras, float)))
    qa = result.qa_dict()
    tnode.SetAttribute(ATTR + "Model", result.model.name)
    tnode.SetAttribute(ATTR + "QAPassed", "true" if qa["passed"] is True else "false")
    tnode.SetAttribute(ATTR + "ResidualRMSMM", f"{result.rms_mm:.4f}")
    mnode = scene.AddNewNodeByClass("vtkMRMLModelNode", f"{result.model.name} (fitted)")
    mnode.SetAndObservePolyData(frame_polydata(result.model))
    mnode.CreateDefaultDisplayNodes()
    d = mnode.GetDisplayNode()
    if d is not None:
        d.SetColor(1.0, 0.5, 0.05)
        d.SetVisibility2D(True)
        d.SetSliceIntersectionThickness(2)
    for fid, res in result.residuals_mm.items():
        mnode.SetAttribute(ATTR + f"ResidualMM.{fid}", f"{res:.4f}")
    mnode.SetAndObserveTransformNodeID(tnode.GetID())
    return tnode, mnode

"""Robot calibration nodes on a real headless MRML scene: the fitted frame lies on the CT's tubes."""
from __future__ import annotations

import numpy as np
import pytest

from SmartBiopsyCoreLib.fiducial_frames.model import load_model
from SmartBiopsyCoreLib.geometry import array_from_vtk_matrix
from SmartBiopsyCoreLib.phantom.robot_frame import calibration_ct
from TrajectoryPlannerLib.calibration.frame_fit import calibrate_from_ct
from TrajectoryPlannerLib.calibration.mrml import add_calibration_nodes
from TrajectoryPlannerLib.errors import TrajectoryPlannerError


def test_calibration_nodes_place_the_frame_model_on_the_ct(scene):
    model = load_model("zframe-7tube")
    ct, truth = calibration_ct(9, model, pixel_mm=1.2, slice_mm=2.0)
    result = calibrate_from_ct(ct, model, {"T": [0.0, 0.0, 0.0]})
    tnode, mnode = add_calibration_nodes(scene, result)
    assert mnode.GetParentTransformNode() is tnode
    m = array_from_vtk_matrix(tnode.GetMatrixTransformToParent())
    assert np.allclose(m, result.matrix_robot_to_ct_ras, atol=1e-9)
    assert tnode.GetAttribute("TrajectoryPlanner.Calibration.QAPassed") == "true"
    # every model point, carried to world by the node's transform, lies close to the true frame surface
    pts = np.array([mnode.GetPolyData().GetPoint(i) for i in range(mnode.GetPolyData().GetNumberOfPoints())])
    world = pts @ m[:3, :3].T + m[:3, 3]
    true = pts @ truth[:3, :3].T + truth[:3, 3]
    assert np.max(np.linalg.norm(world - true, axis=1)) < 0.3
    assert float(mnode.GetAttribute("TrajectoryPlanner.Calibration.ResidualMM.E1")) < 0.5


def test_calibration_nodes_need_a_scene():
    model = load_model("spheres-6")
    ct, _ = calibration_ct(9, model, pixel_mm=1.2, slice_mm=2.0)
    result = calibrate_from_ct(ct, model, {"T": [0.0, 0.0, 0.0]})
    with pytest.raises(TrajectoryPlannerError, match="no MRML scene"):
        add_calibration_nodes(None, result)

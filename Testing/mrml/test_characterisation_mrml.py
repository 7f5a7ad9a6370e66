"""Characterisation MRML glue on a real headless scene."""
from __future__ import annotations

import numpy as np
import pytest

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid


@pytest.fixture
def scene():
    try:
        from SmartBiopsyCoreLib.runtime import new_scene
        return new_scene()
    except ImportError:
        import slicer
        return slicer.vtkMRMLScene()


def _result():
    from SmartBiopsyLib.characterise import habitats, targets
    grid = make_grid((10, -20, 5), (1.5, 1.5, 3.0), (12, 30, 30))
    lab = np.zeros((12, 30, 30), np.uint8)
    lab[2:10, 3:27, 3:15] = 1
    lab[2:10, 3:27, 15:27] = 3
    shape = lab.shape
    adc = np.where(lab == 1, 900.0, 1900.0)
    ef = np.where(lab == 1, 130.0, 20.0)
    vol = lambda a: RasVolume(a.astype(np.float32), grid)
    res = habitats.compute_habitats(vol(adc), vol(ef), None, lab > 0, habitats.HabitatConfig(smooth_sigma_mm=0))
    ts = targets.plan_targets(res.labels, {"adc": vol(adc)})
    return res, ts


def test_nodes_hold_segments_table_and_labelled_targets(scene):
    from SmartBiopsyLib.characterise import mrml as cm
    res, ts = _result()
    nodes = cm.characterisation_nodes(scene, res, ts)
    seg = nodes["segmentation"].GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    assert names == ["A", "C"]
    assert np.allclose(seg.GetNthSegment(0).GetColor(), cm.SEGMENT_STYLE["A"][1])
    # voxel count of segment A equals the habitat label count (exported on the habitat grid)
    import slicer
    import vtk
    from vtk.util import numpy_support
    ref = cm.labelmap_node_from_volume(scene, res.labels, "ref")
    out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(seg.GetSegmentIdBySegmentName("A"))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(nodes["segmentation"], ids, out, ref)
    arr = numpy_support.vtk_to_numpy(out.GetImageData().GetPointData().GetScalars())
    assert int((arr > 0).sum()) == int((res.labels.array == 1).sum())
    scene.RemoveNode(ref)
    scene.RemoveNode(out)
    table = nodes["regions"].GetTable()
    assert table.GetNumberOfRows() == 2
    assert table.GetColumnByName("volume_ml").GetValue(0) == pytest.approx(res.regions[0].volume_ml)
    fid = nodes["targets"]
    assert fid.GetNumberOfControlPoints() == 2
    assert [fid.GetNthControlPointLabel(i) for i in range(2)] == ["A", "C"]
    p = [0.0, 0.0, 0.0]
    fid.GetNthControlPointPosition(1, p)
    assert np.allclose(p, ts[1].point_ras, atol=1e-6)
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0  # temporaries removed

"""Needle line, notch ROI and notch segment nodes on a real headless MRML scene."""
from __future__ import annotations

import numpy as np
import pytest

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyLib.sampling.needle import detect_needle
from SmartBiopsyLib.sampling.needle_sim import simulate_confirmation_ct
from SmartBiopsyLib.sampling.notch import notch_roi_from_detection
from SmartBiopsyLib.sampling.mrml import add_notch_segmentation, add_sampling_nodes, roi_polydata


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def detection():
    rng = np.random.default_rng(0)
    shape = (60, 120, 120)
    arr = (20 + rng.normal(0, 10, shape)).astype(np.float32)
    ct = RasVolume(np.rint(arr).astype(np.int16), make_grid([-60.0, -60.0, -60.0], [1.0, 1.0, 2.0], shape), "ct")
    d = _unit([0.4, 1.0, 0.5])
    target = np.array([2.0, -3.0, 4.0])
    entry = target - 60.0 * d
    sim = simulate_confirmation_ct(ct, entry, target, "17G/18G-20mm", lateral_error_mm=1.0, seed=1)
    return detect_needle(sim.ct, entry, target, needle="17G/18G-20mm", target_name="A")


def _world(node_getter):
    out = [0.0, 0.0, 0.0]
    node_getter(out)
    return np.array(out)


@pytest.mark.parametrize("mode", ["side-notch", "tip-distal"])
def test_nodes_reproduce_needle_and_oriented_notch(scene, detection, mode):
    roi = notch_roi_from_detection(detection, mode, "17G/18G-20mm")
    nodes = add_sampling_nodes(scene, detection, roi, segmentation=True)

    line = nodes["needle"]
    assert line.IsA("vtkMRMLMarkupsLineNode") and line.GetNumberOfControlPoints() == 2
    np.testing.assert_allclose(line.GetNthControlPointPositionWorld(1), detection.tip_ras, atol=1e-6)
    np.testing.assert_allclose(line.GetNthControlPointPositionWorld(0), detection.shaft_start_ras, atol=1e-6)
    assert float(line.GetAttribute("SmartBiopsy.LateralErrorMm")) == pytest.approx(detection.lateral_error_mm, abs=1e-3)
    planned = nodes["planned"]
    np.testing.assert_allclose(planned.GetNthControlPointPositionWorld(1), detection.planned_target_ras, atol=1e-6)

    node = nodes["notch_roi"]
    assert node.IsA("vtkMRMLMarkupsROINode")
    np.testing.assert_allclose(_world(node.GetCenterWorld), roi.centre_ras, atol=1e-6)
    np.testing.assert_allclose(_world(node.GetZAxisWorld), roi.axis, atol=1e-6)
    np.testing.assert_allclose(_world(node.GetXAxisWorld), roi.u_axis, atol=1e-6)
    hu, hv = roi.half_extent_mm
    np.testing.assert_allclose(node.GetSize(), [2 * hu, 2 * hv, roi.length_mm], atol=1e-6)
    assert node.GetAttribute("SmartBiopsy.NotchMode") == mode
    # the ROI's far end lies on the needle axis at the expected distance from the tip
    far_end = _world(node.GetCenterWorld) + 0.5 * roi.length_mm * _world(node.GetZAxisWorld)
    expected = detection.tip_ras - 5.0 * detection.axis if mode == "side-notch" else detection.tip_ras + 20.0 * detection.axis
    np.testing.assert_allclose(far_end, expected, atol=1e-6)

    seg = nodes["segmentation"]
    segment = seg.GetSegmentation().GetSegment(nodes["segment_id"])
    assert segment is not None
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


@pytest.mark.parametrize("mode", ["side-notch", "tip-distal"])
def test_notch_surface_encloses_the_analytic_volume(detection, mode):
    import vtk

    roi = notch_roi_from_detection(detection, mode, "17G/18G-20mm")
    poly = roi_polydata(roi, resolution=128)
    mp = vtk.vtkMassProperties()
    mp.SetInputData(poly)
    mp.Update()
    assert mp.GetVolume() == pytest.approx(roi.volume_mm3, rel=0.005)
    pts = np.array([poly.GetPoint(i) for i in range(poly.GetNumberOfPoints())])
    # every surface point lies on the region's boundary: within it, and not deep inside
    assert np.all(roi.signed_distance_bound(pts) <= 1e-6)
    assert np.all(roi.signed_distance_bound(pts) >= -1e-6 - (0 if roi.shape == "box" else 1e-3 * roi.radius_mm))


def test_several_notches_share_one_segmentation(scene, detection):
    a = notch_roi_from_detection(detection, "side-notch", "17G/18G-20mm")
    b = notch_roi_from_detection(detection, "tip-distal")
    seg, id_a = add_notch_segmentation(scene, a)
    seg2, id_b = add_notch_segmentation(scene, b, segmentation_node=seg)
    assert seg2 is seg and id_a != id_b
    assert seg.GetSegmentation().GetNumberOfSegments() == 2

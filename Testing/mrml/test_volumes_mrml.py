"""RasVolume <-> MRML volume nodes on a real headless scene (the ``scene`` fixture of Testing/conftest.py)."""
from __future__ import annotations

import numpy as np
import pytest
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from scipy.spatial.transform import Rotation

slicer = pytest.importorskip("slicer")

from SmartBiopsyCoreLib.dataio import volumes_mrml  # noqa: E402
def _oblique(dtype=np.float32, shape=(4, 6, 9)) -> RasVolume:
    rng = np.random.default_rng(5)
    rot = Rotation.from_euler("xyz", [15, 30, -50], degrees=True).as_matrix()
    m = make_grid([3.0, -70.0, 12.0], [0.6, 0.9, 4.0], shape, rot)
    meta = {"series_description": "ep2d diff", "series_number": 6, "b_value": 800.0, "units": "a.u.",
            "image_type": ["DERIVED", "PRIMARY"], "acquisition_time": "120343.6"}
    return RasVolume((rng.random(shape) * 1000).astype(dtype), m, "dwi_b800", meta)


def _vtk_matrix(node):
    import vtk

    vm = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(vm)
    return np.array([[vm.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_node_geometry_equals_volume_geometry(scene):
    vol = _oblique()
    node = volumes_mrml.add_volume_node(scene, vol)
    assert node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_allclose(_vtk_matrix(node), vol.ijk_to_ras, atol=1e-9)
    np.testing.assert_allclose(node.GetSpacing(), vol.spacing, atol=1e-9)
    np.testing.assert_allclose(node.GetOrigin(), vol.origin_ras, atol=1e-9)
    assert node.GetImageData().GetDimensions() == (9, 6, 4)
    # a voxel's RAS position through MRML equals the RasVolume mapping
    ijk = np.array([7.0, 2.0, 3.0])
    np.testing.assert_allclose(_vtk_matrix(node) @ np.r_[ijk, 1.0], np.r_[vol.ijk_to_ras_points(ijk)[0], 1.0])
    # voxel (i=7, j=2, k=3) holds array[3, 2, 7]
    assert node.GetImageData().GetScalarComponentAsDouble(7, 2, 3, 0) == pytest.approx(float(vol.array[3, 2, 7]))


def test_round_trip_keeps_array_dtype_and_meta(scene):
    vol = _oblique(np.int16)
    node = volumes_mrml.add_volume_node(scene, vol, name="DWI b800")
    assert node.GetName() == "DWI b800"
    assert node.GetAttribute("DICOM.SeriesDescription") == "ep2d diff"
    assert node.GetAttribute("DICOM.SeriesNumber") == "6"
    assert node.GetAttribute("SmartBiopsy.BValue") == "800"
    back = volumes_mrml.volume_from_node(node)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-9)
    assert back.meta == vol.meta
    # without the JSON attribute the readable attributes still give the main facts back
    node.RemoveAttribute(volumes_mrml.META_JSON_ATTRIBUTE)
    meta = volumes_mrml.volume_from_node(node).meta
    assert meta["b_value"] == 800.0 and meta["series_number"] == 6 and meta["series_description"] == "ep2d diff"


def test_scalar_node_has_grey_display(scene):
    node = volumes_mrml.add_volume_node(scene, _oblique())
    display = node.GetDisplayNode()
    assert display is not None and display.IsA("vtkMRMLScalarVolumeDisplayNode")
    if scene.GetNodeByID(volumes_mrml.GREY_COLOR_ID) is not None:
        assert display.GetColorNodeID() == volumes_mrml.GREY_COLOR_ID


def test_label_map_node_keeps_labels_and_uses_a_label_colour_table(scene):
    vol = _oblique()
    labels = vol.with_array((vol.array > 500).astype(np.float32) * 9)
    node = volumes_mrml.add_volume_node(scene, labels, name="habitats", label=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    display = node.GetDisplayNode()
    assert display.IsA("vtkMRMLLabelMapVolumeDisplayNode")
    present = [c for c in volumes_mrml.LABEL_COLOR_IDS if scene.GetNodeByID(c) is not None]
    if present:
        assert display.GetColorNodeID() == present[0]
    back = volumes_mrml.volume_from_node(node)
    assert np.issubdtype(back.array.dtype, np.integer)
    np.testing.assert_array_equal(back.array, labels.array.astype(int))


def test_label_map_with_fractional_values_is_refused(scene):
    with pytest.raises(ValueError, match="non-integer"):
        volumes_mrml.add_volume_node(scene, _oblique(), label=True)


def test_parent_transform_is_applied_only_on_request(scene):
    vol = _oblique()
    node = volumes_mrml.add_volume_node(scene, vol)
    import vtk

    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = [10.0, -5.0, 2.5]
    vm = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vm.SetElement(r, c, shift[r, c])
    t.SetMatrixTransformToParent(vm)
    node.SetAndObserveTransformNodeID(t.GetID())
    np.testing.assert_allclose(volumes_mrml.volume_from_node(node).ijk_to_ras, vol.ijk_to_ras, atol=1e-9)
    np.testing.assert_allclose(volumes_mrml.volume_from_node(node, apply_parent_transform=True).ijk_to_ras,
                               shift @ vol.ijk_to_ras, atol=1e-9)


def test_real_dwi_loads_into_nodes_with_simpleitk_geometry(scene, shared_data):
    import SimpleITK as sitk
    from SmartBiopsyCoreLib.dataio import dicomio
    root = shared_data / "prostatex-0000"
    if not root.is_dir():
        pytest.skip("PROSTATEx not available")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(root / "adc_scanner")))
    ref = RasVolume.from_sitk(reader.Execute())
    for b, vol in dicomio.load_dwi_series(root / "dwi").items():
        node = volumes_mrml.add_volume_node(scene, vol)
        np.testing.assert_allclose(_vtk_matrix(node), ref.ijk_to_ras, atol=1e-3)
        assert node.GetAttribute("SmartBiopsy.BValue") == f"{b:g}"
        assert node.GetImageData().GetDimensions() == (84, 128, 19)

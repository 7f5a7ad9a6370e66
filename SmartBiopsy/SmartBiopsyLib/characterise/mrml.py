"""MRML glue for characterisation: habitat segmentation, region/radiomics tables and target fiducials.

Functions take the scene explicitly and return the nodes they create; the caller (module Logic or a test)
owns them. No ``slicer.mrmlScene``, no application, no Qt.
"""
from __future__ import annotations

import logging

import numpy as np

from SmartBiopsyCoreLib.geometry import RasVolume, vtk_matrix

logger = logging.getLogger(__name__)

#: segment name -> (label code, RGB 0-1)
SEGMENT_STYLE = {"A": (1, (0.90, 0.20, 0.20)), "B": (2, (0.95, 0.85, 0.20)), "C": (3, (0.20, 0.40, 0.95))}


def labelmap_node_from_volume(scene, volume: RasVolume, name: str | None = None):
    """A ``vtkMRMLLabelMapVolumeNode`` holding ``volume`` (integer labels; RAS geometry). Caller owns it."""
    import vtk
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name or volume.name)
    arr = np.ascontiguousarray(np.asarray(volume.array).astype(np.int16))
    img = vtk.vtkImageData()
    img.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(arr.ravel(), deep=True, array_type=vtk.VTK_SHORT))
    node.SetAndObserveImageData(img)
    node.SetIJKToRASMatrix(vtk_matrix(volume.ijk_to_ras))
    return node


def habitat_segmentation_node(scene, habitats: RasVolume, name: str = "Habitats"):
    """Segmentation node with segments A (red), B (yellow), C (blue) from a habitat label map (1/2/3).

    Regions absent from the map get no segment. Returns the ``vtkMRMLSegmentationNode``.
    """
    import slicer

    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.CreateDefaultDisplayNodes()
    lab = np.asarray(habitats.array)
    for region, (code, rgb) in SEGMENT_STYLE.items():
        if not np.any(lab == code):
            continue
        tmp = labelmap_node_from_volume(scene, habitats.with_array((lab == code).astype(np.uint8)), f"tmp_{region}")
        before = seg.GetSegmentation().GetNumberOfSegments()
        if before == 0:
            seg.SetReferenceImageGeometryParameterFromVolumeNode(tmp)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(tmp, seg)
        scene.RemoveNode(tmp)
        if not ok or seg.GetSegmentation().GetNumberOfSegments() != before + 1:
            raise RuntimeError(f"could not import habitat region {region} into the segmentation")
        segment = seg.GetSegmentation().GetNthSegment(before)
        segment.SetName(region)
        segment.SetColor(*rgb)
    return seg


def _table_node(scene, name: str, columns: dict[str, list]):
    import vtk

    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    t = table.GetTable()
    for col, values in columns.items():
        numeric = all(isinstance(v, (int, float, np.integer, np.floating)) for v in values)
        arr = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        arr.SetName(col)
        for v in values:
            arr.InsertNextValue(float(v) if numeric else str(v))
        t.AddColumn(arr)
    table.Modified()
    return table


def region_table_node(scene, regions: list, name: str = "Habitat regions"):
    """Table node with one row per region (RegionStats dataclasses or dicts)."""
    rows = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in regions]
    keys = list(rows[0]) if rows else ["region"]
    return _table_node(scene, name, {k: [r[k] for r in rows] for k in keys})


def radiomics_table_node(scene, rows: list, name: str = "Habitat radiomics"):
    """Table node in long format: region, map, voxel_count, feature, value, error."""
    cols = {"region": [], "map": [], "voxel_count": [], "feature": [], "value": [], "error": []}
    for r in rows:
        items = list(r.features.items()) or [("", float("nan"))]
        for k, v in items:
            cols["region"].append(r.region); cols["map"].append(r.map_name)
            cols["voxel_count"].append(r.voxel_count); cols["feature"].append(k)
            cols["value"].append(float(v)); cols["error"].append(r.error)
    return _table_node(scene, name, cols)


def targets_fiducial_node(scene, targets: list, name: str = "Habitat targets"):
    """Markups fiducial node with one control point per target, labelled by region (A, B, C); RAS mm."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for t in targets:
        idx = node.AddControlPoint(*[float(v) for v in t.point_ras], t.region)
        desc = f"depth {t.depth_mm:.1f} mm" + ("" if t.targetable else "; NOT safely targetable")
        if getattr(t, "hit_probability", None) is not None:
            desc += f"; hit probability {100 * t.hit_probability:.0f}% (notch >= 50% in region {t.region})"
        node.SetNthControlPointDescription(idx, desc)
    return node


def characterisation_nodes(scene, habitat_result, targets: list, radiomics_rows: list | None = None) -> dict:
    """All characterisation nodes for one result: segmentation, region table, targets, radiomics table."""
    out = {"segmentation": habitat_segmentation_node(scene, habitat_result.labels),
           "regions": region_table_node(scene, habitat_result.regions),
           "targets": targets_fiducial_node(scene, targets)}
    if radiomics_rows:
        out["radiomics"] = radiomics_table_node(scene, radiomics_rows)
    return out

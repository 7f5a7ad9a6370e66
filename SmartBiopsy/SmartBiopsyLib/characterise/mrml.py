"""MRML glue for characterisation: habitat segmentation, region/radiomics tables and target fiducials.

Functions take the scene explicitly and return the nodes they create; the caller (module Logic or a test)
owns them. No ``slicer.mrmlScene``, no application, no Qt.
"""
from __future__ import annotations

import logging

import numpy as np

from SmartBiopsyCoreLib import palette
from SmartBiopsyCoreLib.geometry import RasVolume, vtk_matrix

logger = logging.getLogger(__name__)

#: segment name -> (label code, RGB 0-1): the project palette (SmartBiopsyCoreLib.palette)
SEGMENT_STYLE = {r: (code, palette.HABITAT_COLOURS[code]) for r, code in (("A", 1), ("B", 2), ("C", 3))}


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
    """Segmentation node with segments A, B, C (palette colours) from a habitat label map (1/2/3).

    Regions absent from the map get no segment. Returns the ``vtkMRMLSegmentationNode``.
    """
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.CreateDefaultDisplayNodes()
    lab = np.asarray(habitats.array)
    for region, (code, rgb) in SEGMENT_STYLE.items():
        if np.any(lab == code):
            _import_segment(scene, seg, habitats.with_array((lab == code).astype(np.uint8)), region, rgb,
                            f"habitat region {region}")
    return seg


def _import_segment(scene, seg, mask: RasVolume, name: str, rgb, what: str) -> None:
    """Add one segment ``name`` (colour ``rgb``) from a 0/1 mask volume to ``seg``; the first segment sets the
    segmentation's reference geometry. Raises RuntimeError naming ``what`` when Slicer does not import it."""
    import slicer

    tmp = labelmap_node_from_volume(scene, mask, f"tmp_{name}")
    before = seg.GetSegmentation().GetNumberOfSegments()
    if before == 0:
        seg.SetReferenceImageGeometryParameterFromVolumeNode(tmp)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(tmp, seg)
    scene.RemoveNode(tmp)
    if not ok or seg.GetSegmentation().GetNumberOfSegments() != before + 1:
        raise RuntimeError(f"could not import {what} into the segmentation")
    segment = seg.GetSegmentation().GetNthSegment(before)
    segment.SetName(name)
    segment.SetColor(*rgb)


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


def target_point_nodes(scene, targets: list) -> list:
    """One markups fiducial node per target, "Target A", holding one point labelled "target A" (RAS mm, the
    targets' own world), in the habitat's palette colour (a markups node has one colour for all its points).
    Returns the nodes in target order; the caller owns them."""
    nodes = []
    for t in targets:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"Target {t.region}")
        idx = node.AddControlPoint(*[float(v) for v in t.point_ras], f"target {t.region}")
        desc = f"habitat {t.region} target; depth {t.depth_mm:.1f} mm" + ("" if t.targetable else
                                                                          "; NOT safely targetable")
        node.SetNthControlPointDescription(idx, desc)
        node.SetAttribute("SmartBiopsy.Region", str(t.region))
        node.CreateDefaultDisplayNodes()
        rgb = palette.region_colour(t.region)
        node.GetDisplayNode().SetSelectedColor(*rgb)
        node.GetDisplayNode().SetColor(*rgb)
        node.SetLocked(True)
        nodes.append(node)
    return nodes


def tumour_and_risk_segmentation(scene, tumour: RasVolume | None = None, risk_labelmaps=(), mri_to_ct=None,
                                 name: str = "Tumour and organs at risk"):
    """One ``vtkMRMLSegmentationNode`` in the CT world with a "Tumour" segment and one segment per risk
    structure (organ at risk). Returns the node (None when there is nothing to show); the caller owns it.

    ``tumour``: a mask (non-zero inside) on an MRI grid, placed in the CT world through ``mri_to_ct`` (4x4 RAS,
    MRI world -> CT world; identity when None) without resampling. ``risk_labelmaps``: ``[(label volume on a
    CT grid, {value: structure name})]``, each cropped to its labelled voxels. Colours from the palette
    (``TUMOUR_COLOUR``, ``RISK_COLOURS`` by structure name; unknown structures get the neutral colour).
    """
    parts = []  # the first part sets the segmentation's reference geometry: a CT grid when there is one
    for lab, names in risk_labelmaps or ():
        from scipy import ndimage

        arr = np.asarray(lab.array)
        boxes = ndimage.find_objects(np.clip(arr, 0, None).astype(np.int32))  # one pass: a box per label value
        for value, struct in sorted((names or {}).items()):
            box = boxes[int(value) - 1] if 0 < int(value) <= len(boxes) else None
            if box is None:
                continue
            colour = palette.RISK_COLOURS.get(str(struct).lower(), palette.NEUTRAL_COLOUR)
            parts.append((str(struct), _sub_volume(lab, box, arr[box] == int(value)), colour))
    if tumour is not None and np.any(np.asarray(tumour.array)):
        m = np.eye(4) if mri_to_ct is None else np.asarray(mri_to_ct, float)
        vol = RasVolume((np.asarray(tumour.array) > 0).astype(np.uint8), m @ np.asarray(tumour.ijk_to_ras, float),
                        "tumour")
        parts.append(("Tumour", _cropped(vol), palette.TUMOUR_COLOUR))
    if not parts:
        return None
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.CreateDefaultDisplayNodes()
    for seg_name, vol, rgb in parts:
        _import_segment(scene, seg, vol, seg_name, rgb, seg_name)
    return seg


def _sub_volume(vol: RasVolume, box: tuple, mask: np.ndarray) -> RasVolume:
    """``mask`` (the voxels of ``vol`` inside the slices ``box``, k/j/i) as a uint8 volume placed exactly."""
    shift = np.eye(4)
    shift[:3, 3] = [box[2].start, box[1].start, box[0].start]     # i, j, k
    return RasVolume(np.ascontiguousarray(mask.astype(np.uint8)), np.asarray(vol.ijk_to_ras, float) @ shift,
                     vol.name)


def _cropped(vol: RasVolume, pad: int = 1) -> RasVolume:
    """``vol`` cropped to its non-zero voxels (plus ``pad`` voxels), geometry kept exact."""
    arr = np.asarray(vol.array)
    idx = np.argwhere(arr != 0)
    lo = np.maximum(idx.min(axis=0) - pad, 0)                      # k, j, i
    hi = np.minimum(idx.max(axis=0) + pad + 1, np.array(arr.shape))
    shift = np.eye(4)
    shift[:3, 3] = lo[::-1]                                        # i, j, k
    sub = np.ascontiguousarray(arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    return RasVolume(sub, np.asarray(vol.ijk_to_ras, float) @ shift, vol.name)


def characterisation_nodes(scene, habitat_result, targets: list, radiomics_rows: list | None = None,
                           target_per_node: bool = False) -> dict:
    """All characterisation nodes for one result: segmentation, region table, targets, radiomics table.

    ``target_per_node``: the targets as one coloured node per target (:func:`target_point_nodes`, a list under
    ``"targets"``) instead of one "Habitat targets" node."""
    out = {"segmentation": habitat_segmentation_node(scene, habitat_result.labels),
           "regions": region_table_node(scene, habitat_result.regions),
           "targets": (target_point_nodes(scene, targets) if target_per_node
                       else targets_fiducial_node(scene, targets))}
    if radiomics_rows:
        out["radiomics"] = radiomics_table_node(scene, radiomics_rows)
    return out

"""RasVolume <-> MRML volume nodes (MRML glue: takes the scene explicitly; no slicer.app/mrmlScene/qt).

Voxels are deep-copied between the numpy array (k, j, i) and the node's ``vtkImageData`` (i fastest);
the node's IJK->RAS matrix is the volume's ``ijk_to_ras`` unchanged (both are RAS, mm), so no frame
conversion happens here. ``RasVolume.meta`` is stored on the node as attributes: readable ones
(``DICOM.SeriesDescription``, ``DICOM.SeriesNumber``, ``SmartBiopsy.BValue``, ``SmartBiopsy.Units``,
...) and the whole dictionary as JSON in ``SmartBiopsy.Meta`` for an exact round trip.
"""
from __future__ import annotations

import json
import logging

import numpy as np

from SmartBiopsyCoreLib.geometry import RasVolume, array_from_vtk_matrix, vtk_matrix
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)

#: meta key -> node attribute name (everything else becomes "SmartBiopsy.<key>").
META_ATTRIBUTES = {
    "series_description": "DICOM.SeriesDescription",
    "series_number": "DICOM.SeriesNumber",
    "series_uid": "DICOM.SeriesInstanceUID",
    "study_uid": "DICOM.StudyInstanceUID",
    "modality": "DICOM.Modality",
    "acquisition_date": "DICOM.AcquisitionDate",
    "acquisition_time": "DICOM.AcquisitionTime",
    "b_value": "SmartBiopsy.BValue",
    "units": "SmartBiopsy.Units",
}
META_JSON_ATTRIBUTE = "SmartBiopsy.Meta"
GREY_COLOR_ID = "vtkMRMLColorTableNodeGrey"
#: Preferred colour tables for label maps, first one present in the scene wins.
LABEL_COLOR_IDS = ("vtkMRMLColorTableNodeFileGenericAnatomyColors.txt", "vtkMRMLColorTableNodeLabels")


def _image_data(array: np.ndarray):
    import vtk
    from vtk.util import numpy_support

    arr = np.ascontiguousarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype in (np.int64, np.uint64):
        # VTK "long long" volumes do not render in Slicer; keep the values in 32 bits when they fit
        info = np.iinfo(np.int32)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ValueError("64-bit integer voxel values do not fit in 32 bits; convert the volume first")
        arr = arr.astype(np.int32)
    image = vtk.vtkImageData()
    k, j, i = arr.shape
    image.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(arr.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def _meta_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "\\".join(map(str, value))
    return str(value)


def add_volume_node(scene, volume: RasVolume, name: str | None = None, label: bool = False):
    """Add ``volume`` to ``scene`` as a scalar (or label map) volume node with a display node.

    Returns the new ``vtkMRMLScalarVolumeNode`` / ``vtkMRMLLabelMapVolumeNode`` (owned by the scene).
    Grey colour table for scalars (auto window/level); for label maps the generic anatomy colours if
    the scene has them, else Slicer's default label colours. Label maps must hold integer values.
    """
    array = np.asarray(volume.array)
    if label and not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError(f"label map '{volume.name}' holds non-integer values; round or threshold it first")
        array = array.astype(np.int16)
    cls = "vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name or volume.name)
    node.SetIJKToRASMatrix(vtk_matrix(volume.ijk_to_ras))
    node.SetAndObserveImageData(_image_data(array))

    display_cls = "vtkMRMLLabelMapVolumeDisplayNode" if label else "vtkMRMLScalarVolumeDisplayNode"
    display = scene.AddNewNodeByClass(display_cls)
    if label:
        color_id = next((c for c in LABEL_COLOR_IDS if scene.GetNodeByID(c) is not None), None)
    else:
        color_id = GREY_COLOR_ID if scene.GetNodeByID(GREY_COLOR_ID) is not None else None
        display.AutoWindowLevelOn()
    if color_id is not None:
        display.SetAndObserveColorNodeID(color_id)
    node.SetAndObserveDisplayNodeID(display.GetID())

    for key, value in volume.meta.items():
        if value is None:
            continue
        node.SetAttribute(META_ATTRIBUTES.get(key, f"SmartBiopsy.{key}"), _meta_text(value))
    if volume.meta:
        node.SetAttribute(META_JSON_ATTRIBUTE, jsonio.dumps(volume.meta, default=str))
    logger.debug("added %s '%s' %s", cls, node.GetName(), array.shape[::-1])
    return node


def volume_from_node(node, apply_parent_transform: bool = False) -> RasVolume:
    """A :class:`RasVolume` copy of a scalar/label volume node (array[k, j, i], IJK->RAS in mm).

    By default the geometry is the node's own IJK->RAS (ignoring any parent transform);
    ``apply_parent_transform=True`` folds a linear parent transform in (world RAS). Meta comes from
    the ``SmartBiopsy.Meta`` attribute when present, else from the readable attributes.
    """
    from vtk.util import numpy_support

    image = node.GetImageData() if node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        name = node.GetName() if node is not None else "None"
        raise ValueError(f"volume node '{name}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume node '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components; "
                         f"a scalar volume is needed")
    i, j, k = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i).copy()
    import vtk

    vm = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(vm)
    m = array_from_vtk_matrix(vm)
    if apply_parent_transform and node.GetParentTransformNode() is not None:
        tnode = node.GetParentTransformNode()
        if not tnode.IsTransformToWorldLinear():
            raise ValueError(f"volume node '{node.GetName()}' is under a non-linear transform; harden it first")
        tw = vtk.vtkMatrix4x4()
        tnode.GetMatrixTransformToWorld(tw)
        m = array_from_vtk_matrix(tw) @ m
    meta = _meta_from_attributes(node)
    return RasVolume(array, m, node.GetName(), meta)



def _node_name(node) -> str:
    return node.GetName() if node is not None else "(none)"


def ct_from_node(node, hint: str = "select the planning CT") -> RasVolume:
    """:func:`volume_from_node` of a volume a panel uses as a CT, refused with one sentence (InputDataError)
    unless it is a CT in Hounsfield units (:func:`SmartBiopsyCoreLib.modality.require_ct`), as the command line
    refuses it. ``hint`` says what to select instead."""
    from SmartBiopsyCoreLib.modality import require_ct

    volume = volume_from_node(node)
    require_ct(volume, f"the volume '{_node_name(node)}'", hint)
    return volume


def mri_from_node(node, hint: str = "select the MRI") -> RasVolume:
    """:func:`volume_from_node` of a volume a panel uses as an MRI, refused with one sentence (InputDataError)
    when it is (or looks like) a CT in Hounsfield units (:func:`SmartBiopsyCoreLib.modality.require_mri`)."""
    from SmartBiopsyCoreLib.modality import require_mri

    volume = volume_from_node(node)
    require_mri(volume, f"the volume '{_node_name(node)}'", hint)
    return volume


def _meta_from_attributes(node) -> dict:
    text = node.GetAttribute(META_JSON_ATTRIBUTE)
    if text:
        try:
            return json.loads(text)
        except ValueError:
            logger.warning("ignoring unreadable %s on node '%s'", META_JSON_ATTRIBUTE, node.GetName())
    reverse = {v: k for k, v in META_ATTRIBUTES.items()}
    meta = {}
    for attr in node.GetAttributeNames() or ():
        if attr in reverse:
            key = reverse[attr]
        elif attr.startswith("SmartBiopsy."):
            key = attr[len("SmartBiopsy."):]
        else:
            continue
        value = node.GetAttribute(attr)
        try:
            value = float(value) if key in ("b_value",) else (int(value) if key == "series_number" else value)
        except ValueError:
            pass
        meta[key] = value
    return meta


def add_time_series_node(scene, frames, times_s, name: str, kind: str = "DCE", sequences_logic=None):
    """Add a time series (a DCE or variable-flip-angle set) as ONE Sequence node with a browser.

    ``frames``: RasVolumes on one grid; ``times_s``: the index values (seconds from the first frame for a
    DCE; for ``kind="VFA"`` pass the flip angles in degrees). Returns ``(sequence node, browser node,
    proxy volume node or None)``; all are owned by the scene. The proxy node (the frame shown in the
    views) is created when ``sequences_logic`` (vtkSlicerSequencesLogic) is given.
    """
    if not frames or len(frames) != len(times_s):
        raise ValueError("a time series needs one index value per frame")
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{name} ({kind})")
    if kind == "VFA":
        seq.SetIndexName("flip angle")
        seq.SetIndexUnit("deg")
    else:
        seq.SetIndexName("time")
        seq.SetIndexUnit("s")
    seq.SetIndexType(seq.NumericIndex)
    for vol, t in zip(frames, times_s):
        tmp = add_volume_node(scene, vol, f"{name}_frame")
        seq.SetDataNodeAtValue(tmp, f"{float(t):g}")
        display = tmp.GetDisplayNode()
        scene.RemoveNode(tmp)
        if display is not None:
            scene.RemoveNode(display)
    seq.SetAttribute("SmartBiopsy.TimeSeriesKind", kind)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
    browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
    proxy = None
    if sequences_logic is not None:
        sequences_logic.UpdateProxyNodesFromSequences(browser)
        proxy = browser.GetProxyNode(seq)
        if proxy is not None:
            proxy.SetName(name)
    return seq, browser, proxy


def time_series_from_sequence_node(sequence_node) -> tuple[list, list, str]:
    """``(frames [RasVolume], index values [float], kind)`` of a Sequence node of volumes (inverse of
    :func:`add_time_series_node`; for a DCE the index values are seconds from the first frame, as
    ``maps.compute_ef_dynamic`` takes them). A node whose index is not numeric raises ValueError."""
    frames, values = [], []
    for n in range(sequence_node.GetNumberOfDataNodes()):
        node = sequence_node.GetNthDataNode(n)
        frames.append(volume_from_node(node))
        text = sequence_node.GetNthIndexValue(n)
        try:
            values.append(float(text))
        except ValueError:
            raise ValueError(f"sequence '{sequence_node.GetName()}' has a non-numeric index value {text!r}; "
                             "a DCE needs its frame times in seconds") from None
    kind = sequence_node.GetAttribute("SmartBiopsy.TimeSeriesKind") or "DCE"
    return frames, values, kind

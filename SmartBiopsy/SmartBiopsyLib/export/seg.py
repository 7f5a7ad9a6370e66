"""DICOM Segmentation objects (highdicom): write label maps as binary segments referencing their source series,
and read any SEG (this project's, dcmqi's, highdicom's) back into labels, frames and per-segment masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import logging

import numpy as np

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyLib.export.common import (CAT_ALTERED, CAT_ANATOMY, GENERIC_ANATOMY, MANUFACTURER, MODEL,
                                          DEVICE_SERIAL, RISK_TYPES, TYPE_NEOPLASM, ExportedObject, code,
                                          need_highdicom, software_version)
from SmartBiopsyLib.export.sources import SourceSeries, volume_slices

logger = logging.getLogger(__name__)


@dataclass
class SegmentSpec:
    """One segment: ``values`` of the label map that belong to it, its label, SNOMED category/type triplets and
    whether an algorithm produced it (then ``algorithm`` names it)."""

    label: str
    values: tuple
    category: tuple
    type: tuple
    algorithm: str = ""
    description: str = ""


def tumour_segment() -> SegmentSpec:
    """The tumour: every non-zero voxel of the tumour mask."""
    return SegmentSpec("Tumour", (), CAT_ALTERED, TYPE_NEOPLASM, "", "tumour segmentation supplied for the case")


def habitat_segments(codes: dict) -> list[SegmentSpec]:
    """Habitats A/B/C of the habitat label map ({'A': 1, 'B': 2, 'C': 3}); absent regions are left out."""
    return [SegmentSpec(f"Habitat {r}", (int(v),), CAT_ALTERED, TYPE_NEOPLASM, "SmartBiopsy habitats",
                        f"tumour habitat {r}") for r, v in sorted(codes.items())]


def risk_segments(names: dict) -> list[SegmentSpec]:
    """Segments of a CT risk label map {value: name}."""
    out = []
    for value, name in sorted(names.items()):
        t = RISK_TYPES.get(str(name).lower(), GENERIC_ANATOMY)
        out.append(SegmentSpec(str(name), (int(value),), CAT_ANATOMY, t, "", "risk structure for the trajectory planning"))
    return out


def _descriptions(hd, specs: list[SegmentSpec]):
    from pydicom.sr.codedict import codes

    out = []
    for n, s in enumerate(specs, start=1):
        kw = dict(segment_number=n, segment_label=s.label, segmented_property_category=code(*s.category),
                  segmented_property_type=code(*s.type))
        if s.algorithm:
            kw.update(algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                      algorithm_identification=hd.AlgorithmIdentificationSequence(
                          name=s.algorithm, family=codes.cid7162.ClusterAnalysis, version=software_version()))
        else:
            kw.update(algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        desc = hd.seg.SegmentDescription(**kw)
        if s.description:
            desc.SegmentDescription = s.description[:64]
        out.append(desc)
    return out


def write_segmentation(segments: list, source: SourceSeries, path, *, series_number: int,
                       series_description: str, uid=None) -> ExportedObject:
    """Write ``segments`` [(SegmentSpec, label map RasVolume on exactly the source series' grid)] as ONE BINARY DICOM
    SEG, one segment per spec (segments may overlap; a spec without values takes every non-zero voxel). An empty
    segment is refused."""
    hd = need_highdicom()
    from pydicom.uid import generate_uid

    specs = [s for s, _ in segments]
    masks = []
    for s, vol in segments:
        arr = volume_slices(vol, source)
        m = np.isin(arr, s.values) if s.values else (arr != 0)
        if not m.any():
            raise InputDataError(f"segment '{s.label}' is empty; it cannot be exported as a DICOM segment")
        masks.append(m)
    pixel = np.stack(masks, axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=source.datasets, pixel_array=pixel,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(hd, specs), series_instance_uid=uid or generate_uid(),
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=MODEL, software_versions=software_version(),
        device_serial_number=DEVICE_SERIAL, content_label="SEGMENTATION", content_description=series_description[:64],
        series_description=series_description[:64])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(path))
    return ExportedObject(
        kind="seg", path=path.name, description=series_description, sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID), series_instance_uid=str(seg.SeriesInstanceUID),
        study_instance_uid=str(seg.StudyInstanceUID),
        references={"source": source.to_dict()},
        content={"segments": [{"number": n, "label": s.label, "voxels": int(m.sum())}
                              for n, (s, m) in enumerate(zip(specs, masks), start=1)],
                 "frames": int(seg.NumberOfFrames)})


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class ImportedSegment:
    number: int
    label: str
    category: str
    type: str
    frames: int
    voxels: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class ImportedSegmentation:
    """A DICOM SEG read back: segments (label, coded type, number of frames and set voxels), the referenced series
    and the masks on the SEG's own plane grid: ``masks[label]`` is a (planes, rows, cols) bool array whose planes
    are the distinct plane positions sorted along the slice normal, ``positions_lps`` their positions."""

    path: str
    segmentation_type: str
    segments: list
    referenced_series_uid: str
    frame_of_reference_uid: str
    masks: dict = field(repr=False, default_factory=dict)
    positions_lps: np.ndarray = field(repr=False, default=None)

    def overlap_voxels(self, a: str, b: str) -> int:
        return int(np.count_nonzero(self.masks[a] & self.masks[b]))

    def to_dict(self) -> dict:
        return {"path": self.path, "segmentation_type": self.segmentation_type,
                "segments": [s.to_dict() for s in self.segments],
                "referenced_series_uid": self.referenced_series_uid,
                "frame_of_reference_uid": self.frame_of_reference_uid}


def read_segmentation(path) -> ImportedSegmentation:
    """Read a DICOM SEG (BINARY or FRACTIONAL; fractional values > 0.5 count as inside) from any writer.

    Frames are placed by their Plane Position (Patient) so segments stored on different frame subsets
    (dcmqi omits empty frames) land on the same planes; a corrupt or non-SEG file raises InputDataError."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InputDataError(f"{Path(path).name} is not a readable DICOM file ({exc}); check the file") from None
    if str(getattr(ds, "Modality", "")) != "SEG" or "SegmentSequence" not in ds:
        raise InputDataError(f"{Path(path).name} is not a DICOM Segmentation object; choose a SEG file")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        raise InputDataError(f"{Path(path).name} has unreadable pixel data ({exc}); the file may be truncated") from None
    n = int(getattr(ds, "NumberOfFrames", 1))
    pixels = pixels.reshape(n, int(ds.Rows), int(ds.Columns))
    seg_type = str(ds.SegmentationType)
    if seg_type == "FRACTIONAL":
        mx = float(getattr(ds, "MaximumFractionalValue", 255))
        inside = pixels.astype(np.float32) / mx > 0.5
    else:
        inside = pixels > 0
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    try:
        iop = np.asarray((shared.PlaneOrientationSequence[0] if shared is not None and "PlaneOrientationSequence" in shared
                          else ds.PerFrameFunctionalGroupsSequence[0].PlaneOrientationSequence[0]).ImageOrientationPatient,
                         float)
    except Exception:  # noqa: BLE001
        raise InputDataError(f"{Path(path).name} has no plane orientation; it cannot be placed in space") from None
    normal = np.cross(iop[:3], iop[3:])
    frame_pos, frame_seg = [], []
    for f in ds.PerFrameFunctionalGroupsSequence:
        frame_pos.append(np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float))
        ident = f if "SegmentIdentificationSequence" in f else shared  # one segment: may be shared by all frames
        if ident is None or "SegmentIdentificationSequence" not in ident:
            raise InputDataError(f"{Path(path).name} has a frame without segment identification; the file is damaged")
        frame_seg.append(int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber))
    frame_pos = np.asarray(frame_pos)
    dist = np.round(frame_pos @ normal, 3)
    planes = np.unique(dist)
    plane_of = np.searchsorted(planes, dist)
    positions = np.array([frame_pos[np.nonzero(plane_of == p)[0][0]] for p in range(len(planes))])
    segments, masks = [], {}
    for item in ds.SegmentSequence:
        num = int(item.SegmentNumber)
        label = str(item.SegmentLabel)
        mask = np.zeros((len(planes), int(ds.Rows), int(ds.Columns)), bool)
        idx = [k for k, s in enumerate(frame_seg) if s == num]
        for k in idx:
            mask[plane_of[k]] |= inside[k]
        cat = item.SegmentedPropertyCategoryCodeSequence[0]
        typ = item.SegmentedPropertyTypeCodeSequence[0]
        segments.append(ImportedSegment(num, label, f"{cat.CodingSchemeDesignator}:{cat.CodeValue} {cat.CodeMeaning}",
                                        f"{typ.CodingSchemeDesignator}:{typ.CodeValue} {typ.CodeMeaning}",
                                        len(idx), int(mask.sum())))
        masks[label] = mask
    ref = ""
    if "ReferencedSeriesSequence" in ds:
        ref = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return ImportedSegmentation(str(path), seg_type, segments, ref, str(getattr(ds, "FrameOfReferenceUID", "")),
                                masks, positions)

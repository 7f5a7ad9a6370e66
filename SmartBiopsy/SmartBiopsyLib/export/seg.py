"""DICOM Segmentation objects (highdicom): write label maps as binary segments referencing their source series,
and read any SEG (this project's, dcmqi's, highdicom's) back into labels, frames and per-segment masks.

Every segment carries its Recommended Display CIELab Value from the project palette
(``SmartBiopsyCoreLib.palette``): habitat B has the same colour in a PACS viewer as in the scene and the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import logging

import numpy as np

from SmartBiopsyCoreLib import palette
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyLib.export.common import (CAT_ALTERED, CAT_ANATOMY, GENERIC_ANATOMY, MANUFACTURER, MODEL,
                                          DEVICE_SERIAL, RISK_TYPES, TYPE_NEOPLASM, ExportedObject, code,
                                          need_highdicom, software_version)
from SmartBiopsyLib.export.sources import SourceSeries, volume_slices

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ colours
# sRGB (IEC 61966-2-1, D65) <-> CIE XYZ <-> CIE L*a*b* (D65 reference white, as dcmqi and highdicom use) <->
# the DICOM scaled form (PS3.3 C.10.7.1.1): L* 0..100 -> 0..0xFFFF, a*/b* -128..127 -> 0..0xFFFF (0 = 0x8080).
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_EPS, _KAPPA = 216.0 / 24389.0, 24389.0 / 27.0


def srgb_to_cielab(rgb) -> tuple[float, float, float]:
    """(L*, a*, b*) of an sRGB colour with components in 0..1 (D65 reference white)."""
    c = np.clip(np.asarray(rgb, float)[:3], 0.0, 1.0)
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = (_SRGB_TO_XYZ @ linear) / _WHITE_D65
    f = np.where(t > _EPS, np.cbrt(t), (_KAPPA * t + 16.0) / 116.0)
    return float(116.0 * f[1] - 16.0), float(500.0 * (f[0] - f[1])), float(200.0 * (f[1] - f[2]))


def cielab_to_srgb(lab) -> tuple[float, float, float]:
    """sRGB components (0..1, clipped to the sRGB gamut) of a CIE L*a*b* colour (D65 reference white)."""
    L, a, b = (float(v) for v in lab)
    fy = (L + 16.0) / 116.0
    f = np.array([fy + a / 500.0, fy, fy - b / 200.0])
    t = np.where(f ** 3 > _EPS, f ** 3, (116.0 * f - 16.0) / _KAPPA)
    t[1] = fy ** 3 if L > _KAPPA * _EPS else L / _KAPPA
    linear = np.linalg.solve(_SRGB_TO_XYZ, t * _WHITE_D65)
    linear = np.clip(linear, 0.0, 1.0)
    c = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1.0 / 2.4) - 0.055)
    return tuple(float(v) for v in np.clip(c, 0.0, 1.0))


def cielab_to_dicom(lab) -> tuple[int, int, int]:
    """The DICOM scaled CIELab triplet (three unsigned 16-bit integers) of (L*, a*, b*)."""
    L, a, b = (float(v) for v in lab)
    scaled = (L * 0xFFFF / 100.0, (a + 128.0) * 0xFFFF / 255.0, (b + 128.0) * 0xFFFF / 255.0)
    return tuple(int(min(0xFFFF, max(0, round(v)))) for v in scaled)


def dicom_to_cielab(values) -> tuple[float, float, float]:
    """(L*, a*, b*) of a DICOM scaled CIELab triplet."""
    L, a, b = (float(v) for v in values)
    return L * 100.0 / 0xFFFF, a * 255.0 / 0xFFFF - 128.0, b * 255.0 / 0xFFFF - 128.0


def dicom_cielab_of_rgb(rgb) -> tuple[int, int, int]:
    """Recommended Display CIELab Value (DICOM scaled) of an sRGB colour with components in 0..1."""
    return cielab_to_dicom(srgb_to_cielab(rgb))


def rgb_of_dicom_cielab(values) -> tuple[float, float, float]:
    """sRGB (0..1) of a Recommended Display CIELab Value (DICOM scaled)."""
    return cielab_to_srgb(dicom_to_cielab(values))


def risk_colour(name) -> tuple:
    """Colour of a risk structure: the palette's, by name (the same rule as the scene's segmentation)."""
    return palette.RISK_COLOURS.get(str(name).lower(), palette.NEUTRAL_COLOUR)


# ------------------------------------------------------------------------------------------------ writing
@dataclass
class SegmentSpec:
    """One segment: ``values`` of the label map that belong to it, its label, SNOMED category/type triplets,
    whether an algorithm produced it (then ``algorithm`` names it) and its display colour (sRGB 0..1, written as
    the Recommended Display CIELab Value; None: no recommendation)."""

    label: str
    values: tuple
    category: tuple
    type: tuple
    algorithm: str = ""
    description: str = ""
    colour: tuple | None = None


def tumour_segment() -> SegmentSpec:
    """The tumour: every non-zero voxel of the tumour mask (palette tumour colour)."""
    return SegmentSpec("Tumour", (), CAT_ALTERED, TYPE_NEOPLASM, "", "tumour segmentation supplied for the case",
                       palette.TUMOUR_COLOUR)


def habitat_segments(codes: dict) -> list[SegmentSpec]:
    """Habitats A/B/C of the habitat label map ({'A': 1, 'B': 2, 'C': 3}), each in its palette colour; absent
    regions are left out."""
    return [SegmentSpec(f"Habitat {r}", (int(v),), CAT_ALTERED, TYPE_NEOPLASM, "SmartBiopsy habitats",
                        f"tumour habitat {r}", palette.region_colour(str(r))) for r, v in sorted(codes.items())]


def risk_segments(names: dict) -> list[SegmentSpec]:
    """Segments of a CT risk label map {value: name}, coloured as the scene colours them."""
    out = []
    for value, name in sorted(names.items()):
        t = RISK_TYPES.get(str(name).lower(), GENERIC_ANATOMY)
        out.append(SegmentSpec(str(name), (int(value),), CAT_ANATOMY, t, "", "risk structure for the trajectory planning",
                               risk_colour(name)))
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
        if s.colour is not None:
            desc.RecommendedDisplayCIELabValue = list(dicom_cielab_of_rgb(s.colour))
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
        content={"segments": [{"number": n, "label": s.label, "voxels": int(m.sum()),
                               "colour": palette.hex_colour(s.colour) if s.colour is not None else None}
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
    display_rgb: tuple | None = None   # sRGB 0..1 of the Recommended Display CIELab Value, None when absent

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
        lab = item.get("RecommendedDisplayCIELabValue")
        rgb = rgb_of_dicom_cielab(list(lab)) if lab is not None and len(list(lab)) == 3 else None
        segments.append(ImportedSegment(num, label, f"{cat.CodingSchemeDesignator}:{cat.CodeValue} {cat.CodeMeaning}",
                                        f"{typ.CodingSchemeDesignator}:{typ.CodeValue} {typ.CodeMeaning}",
                                        len(idx), int(mask.sum()), rgb))
        masks[label] = mask
    ref = ""
    if "ReferencedSeriesSequence" in ds:
        ref = str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return ImportedSegmentation(str(path), seg_type, segments, ref, str(getattr(ds, "FrameOfReferenceUID", "")),
                                masks, positions)

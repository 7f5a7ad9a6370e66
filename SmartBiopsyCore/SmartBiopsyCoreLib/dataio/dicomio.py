"""DICOM series in and out with correct geometry (core: pydicom, SimpleITK, numpy; no ``slicer``).

Reading
    :func:`scan_dicom_folder` walks a folder (recursively), reads only headers and groups image files
    into series by SeriesInstanceUID; :func:`load_dicom_series` turns one series (or one b-value of a
    multi-b DWI series) into a :class:`RasVolume`; :func:`load_dwi_series` returns every b-value.
    Slices are sorted by their position along the slice normal (ImagePositionPatient . (row x column
    cosine)), so oblique acquisitions keep their true geometry. Missing slices (a gap larger than 1.5x
    the median spacing), duplicated slices, irregular spacing, gantry tilt and slices of a different size
    or orientation raise :class:`InputDataError` naming the series and the problem.

Writing
    :func:`write_dicom_series` and :func:`write_dwi_series` write CT or MR Image Storage files (one
    file per slice, explicit VR little endian) that SimpleITK's GDCM reader and this module read back
    with the same geometry. Voxel values are stored as int16/uint16 with RescaleSlope/Intercept.

Frames and units: DICOM is LPS; the LPS<->RAS conversion is done only by
``SmartBiopsyCoreLib.geometry``. Returned volumes are in RAS mm with rescaled values (HU for CT,
the scanner's units for MR; scanner ADC maps are 1e-6 mm^2/s). ``RasVolume.meta`` keeps
``series_description``, ``series_number``, ``series_uid``, ``study_uid``, ``modality``,
``acquisition_date``, ``acquisition_time``, ``image_type``, ``b_value`` (DWI), ``units`` and
``source_path``.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from SmartBiopsyCoreLib.geometry import (
    RasVolume,
    ijk_to_ras_from_lps_geometry,
    lps_geometry_from_ijk_to_ras,
)

from SmartBiopsyCoreLib.errors import InputDataError

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Private creator that owns the Siemens B_value element (0019,xx0C) in Siemens MR files.
SIEMENS_MR_CREATOR = "SIEMENS MR HEADER"
ADC_UNITS = "1e-6 mm^2/s"

#: Relative tolerance on slice spacing before a series is called irregular.
SPACING_REL_TOL = 0.02
#: A gap larger than this multiple of the median spacing means missing slices.
MISSING_GAP_FACTOR = 1.5

#: Element values larger than this are read from the file only when used (the pixel data).
_DEFER_BYTES = 4096
#: File endings never parsed as DICOM while scanning a folder.
_NOT_DICOM_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".raw", ".json", ".txt", ".csv",
                         ".md", ".py", ".png", ".jpg", ".jpeg", ".zip", ".gz", ".seg.nrrd", ".mrb", ".mrml",
                         ".yaml", ".yml", ".html", ".pdf")
_SEQ_B_RE = re.compile(r"ep_b(\d+(?:\.\d+)?)(?:t|#|$)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


# ------------------------------------------------------------------------------------------------
# scan
# ------------------------------------------------------------------------------------------------
@dataclass
class DicomSeriesInfo:
    """One DICOM image series found by :func:`scan_dicom_folder`.

    ``b_values`` lists the distinct diffusion b-values (s/mm^2) of a DWI series (empty otherwise);
    ``files`` are the image files of the series (unsorted).
    """

    uid: str
    description: str
    number: int | None
    modality: str
    n_files: int
    b_values: list[float] = field(default_factory=list)
    study_uid: str = ""
    patient_id: str = ""
    acquisition_date: str = ""
    acquisition_time: str = ""
    image_type: list[str] = field(default_factory=list)
    rows: int = 0
    columns: int = 0
    frame_of_reference_uid: str = ""
    flip_angle: float | None = None          # degrees (FlipAngle of the first image)
    trigger_time_ms: float | None = None     # TriggerTime of the first image (ms)
    sop_class_uid: str = ""
    samples_per_pixel: int = 1
    files: list[str] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        """Human name: 'description (series N)'."""
        num = f"series {self.number}" if self.number is not None else "no series number"
        return f"'{self.description or 'unnamed'}' ({num})"

    @property
    def is_multi_b(self) -> bool:
        return len(self.b_values) > 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("files")
        return d


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace").strip("\x00 ")
    return str(value).strip()


def _number(value) -> float | None:
    """First number in a DICOM value of any VR (IS/DS/FD/OB/UN bytes)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1", "replace")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    m = _NUMBER_RE.search(str(value))
    return float(m.group()) if m else None


def _siemens_b_value(ds) -> float | None:
    """Siemens (0019,xx0C) B_value when the block is owned by a Siemens creator (or unlabeled 0019,100C)."""
    tags = [t for t in ds.keys() if t.group == 0x0019]
    if not tags:
        return None
    for tag in tags:
        if 0x10 <= tag.element <= 0xFF and _text(ds[tag].value).upper().startswith("SIEMENS"):
            el = ds.get((0x0019, (tag.element << 8) | 0x0C))
            if el is not None:
                return _number(el.value)
    el = ds.get((0x0019, 0x100C))
    if el is not None and (0x0019, 0x0010) not in ds:
        return _number(el.value)
    return None


def _is_parametric_map(ds) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return any(t in ("ADC", "EADC", "FA", "EXP") for t in image_type)


def dicom_b_value(ds) -> float | None:
    """Diffusion b-value (s/mm^2) of one DICOM image, or None.

    Order: standard DiffusionBValue (0018,9087); Siemens private (0019,100C); Siemens sequence name
    ``*ep_b800t``. Derived maps (ADC, FA) have no b-value even if the scanner copied one.
    """
    if _is_parametric_map(ds):
        return None
    el = ds.get((0x0018, 0x9087))
    if el is not None and el.value not in (None, b"", ""):
        b = _number(el.value)
        if b is not None:
            return b
    b = _siemens_b_value(ds)
    if b is not None:
        return b
    m = _SEQ_B_RE.search(_text(ds.get("SequenceName")))
    if m:
        return float(m.group(1))
    return None


def _is_dicom_file(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) >= 132 and head[128:132] == b"DICM"


@dataclass
class _ScanResult:
    series: dict[str, DicomSeriesInfo]
    headers: dict[str, object]          # file -> header dataset
    corrupt: list[str]                  # files that look like DICOM but cannot be parsed
    n_files: int


def _scan(path, progress=None, should_cancel=None) -> _ScanResult:
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputDataError(f"{path} does not exist (neither a DICOM folder nor a file); check the path")
    if os.path.isfile(path):
        files = [path]
    else:
        files = walk_files(path)
    series: dict[str, DicomSeriesInfo] = {}
    headers: dict[str, object] = {}
    corrupt: list[str] = []
    b_sets: dict[str, set] = defaultdict(set)
    for n, f in enumerate(files):
        if should_cancel is not None and should_cancel():
            raise InputDataError("reading the DICOM folder was cancelled")
        if progress is not None and n % 50 == 0:
            progress(n / max(len(files), 1), f"scanning DICOM files ({n}/{len(files)})")
        name = os.path.basename(f).upper()
        if name == "DICOMDIR" or name.lower().endswith(_NOT_DICOM_EXTENSIONS):
            continue
        try:
            # one parse per file: large values (pixel data) are deferred and read from the file on use
            ds = pydicom.dcmread(f, defer_size=_DEFER_BYTES, force=True)
        except InvalidDicomError:
            continue
        except Exception as exc:  # truncated headers raise EOFError/ValueError/struct errors
            if _is_dicom_file(f) or f.lower().endswith((".dcm", ".ima")):
                logger.warning("cannot parse DICOM file %s: %s", f, exc)
                corrupt.append(f)
            continue
        uid = _text(ds.get("SeriesInstanceUID"))
        if not uid or "Rows" not in ds or "Columns" not in ds:
            if not uid and (_is_dicom_file(f) or f.lower().endswith((".dcm", ".ima"))):
                # a DICOM preamble but no usable header: most likely truncated
                corrupt.append(f)
            continue
        headers[f] = ds
        info = series.get(uid)
        if info is None:
            num = _number(ds.get("SeriesNumber"))
            info = DicomSeriesInfo(
                uid=uid,
                description=_text(ds.get("SeriesDescription")) or _text(ds.get("ProtocolName")),
                number=int(num) if num is not None else None,
                modality=_text(ds.get("Modality")),
                n_files=0,
                study_uid=_text(ds.get("StudyInstanceUID")),
                patient_id=_text(ds.get("PatientID")),
                acquisition_date=_text(ds.get("AcquisitionDate")) or _text(ds.get("SeriesDate")),
                acquisition_time=_text(ds.get("AcquisitionTime")) or _text(ds.get("SeriesTime")),
                image_type=[str(v) for v in (ds.get("ImageType") or [])],
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                frame_of_reference_uid=_text(ds.get("FrameOfReferenceUID")),
                flip_angle=_number(ds.get("FlipAngle")),
                trigger_time_ms=_number(ds.get("TriggerTime")),
                sop_class_uid=_text(ds.get("SOPClassUID")),
                samples_per_pixel=int(_number(ds.get("SamplesPerPixel")) or 1),
            )
            series[uid] = info
        else:
            t = _text(ds.get("AcquisitionTime"))
            if t and (not info.acquisition_time or t < info.acquisition_time):
                info.acquisition_time = t
        info.n_files += 1
        info.files.append(f)
        b = dicom_b_value(ds)
        if b is not None:
            b_sets[uid].add(b)
    for uid, info in series.items():
        info.b_values = sorted(b_sets.get(uid, ()))
    if progress is not None:
        progress(1.0, f"found {len(series)} DICOM series")
    return _ScanResult(series, headers, corrupt, len(files))


def walk_files(path) -> list[str]:
    """Every file below ``path`` (sorted, hidden files skipped), following symbolic links to folders and
    files once each: a series reached through a link is read, and a file reached twice (a link next to its
    target) is listed once, under the first path met."""
    seen_dirs, seen_files, out = set(), set(), []
    for root, dirs, names in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:  # a link cycle or a second link to a folder already walked
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort()
        for n in sorted(names):
            if n.startswith("."):
                continue
            f = os.path.join(root, n)
            rf = os.path.realpath(f)
            if rf in seen_files or not os.path.isfile(f):
                continue  # a second path to the same file, or a dangling link
            seen_files.add(rf)
            out.append(f)
    return out


def scan_dicom_folder(path, progress: Callable | None = None,
                      should_cancel: Callable | None = None) -> list[DicomSeriesInfo]:
    """All DICOM image series below ``path`` (recursive; headers only), sorted by series number.

    Files that are not DICOM are ignored; files that look like DICOM but cannot be parsed are logged.
    """
    res = _scan(path, progress, should_cancel)
    return sorted(res.series.values(), key=lambda s: (s.number if s.number is not None else 1 << 30, s.description))


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------
def _series_list_text(series) -> str:
    return "; ".join(
        f"{s.label} {s.modality} {s.n_files} files" + (f" b={_fmt_b(s.b_values)}" if s.b_values else "")
        for s in series)


def _fmt_b(bs) -> str:
    return "/".join(f"{b:g}" for b in bs)


def _select_series(res: _ScanResult, path, series_uid) -> DicomSeriesInfo:
    if not res.series:
        _refuse_corrupt(res, path)
        if res.n_files == 0:
            raise InputDataError(f"the folder {path} is empty; choose the folder that holds the DICOM files")
        raise InputDataError(f"no DICOM images were found in {path} ({res.n_files} file(s), none of them a "
                             f"DICOM image); choose the folder that holds the DICOM files")
    if series_uid is None:
        if len(res.series) > 1:
            ordered = sorted(res.series.values(), key=lambda s: (s.number or 0, s.description))
            raise InputDataError(f"{path} holds {len(res.series)} DICOM series ({_series_list_text(ordered)}); "
                                 f"choose one of them")
        return next(iter(res.series.values()))
    if series_uid not in res.series:
        raise InputDataError(f"series {series_uid} is not in {path}; found: "
                             f"{_series_list_text(res.series.values())}")
    return res.series[series_uid]


def _unit_vector_checks(info: DicomSeriesInfo, headers):
    """Orientation, size and pixel spacing shared by every slice (else InputDataError)."""
    iops = []
    for ds in headers:
        iop = ds.get("ImageOrientationPatient")
        ipp = ds.get("ImagePositionPatient")
        if iop is None or ipp is None or len(iop) != 6 or len(ipp) != 3:
            raise InputDataError(f"series {info.label} has images without position/orientation tags, so its "
                                 f"3-D geometry is unknown; it cannot be used for planning")
        iops.append([float(v) for v in iop])
    iops = np.asarray(iops)
    if np.max(np.abs(iops - iops[0])) > 1e-3:
        raise InputDataError(f"series {info.label} mixes slices of different orientations; "
                             f"load each orientation as its own series (export them separately)")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in headers}
    if len(sizes) > 1:
        raise InputDataError(f"series {info.label} mixes slices of different sizes {sorted(sizes)}; "
                             f"export the series again or load its parts separately")
    ps = np.asarray([[float(v) for v in (ds.get("PixelSpacing") or [1.0, 1.0])] for ds in headers])
    if np.max(np.abs(ps - ps[0])) > 1e-4 * max(1.0, float(ps[0].max())):
        raise InputDataError(f"series {info.label} mixes slices with different pixel spacing; "
                             f"export the series again or load its parts separately")
    if not any("PixelSpacing" in ds for ds in headers):
        logger.warning("series %s has no PixelSpacing; assuming 1 mm", info.label)
    row = iops[0, :3] / np.linalg.norm(iops[0, :3])
    col = iops[0, 3:] / np.linalg.norm(iops[0, 3:])
    if abs(float(row @ col)) > 1e-3:
        raise InputDataError(f"series {info.label} has non-orthogonal row and column directions; "
                             f"the file headers are damaged")
    return row, col, ps[0]


def _sorted_geometry(info: DicomSeriesInfo, files: list[str], headers: list, b_text: str = ""):
    """Sort slices along the normal: (files, headers, origin_lps, spacing ijk, direction 3x3 LPS)."""
    row, col, ps = _unit_vector_checks(info, headers)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    pos = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    pos = pos[order]
    files = [files[i] for i in order]
    headers = [headers[i] for i in order]
    where = f"series {info.label}{b_text}"
    if len(files) > 1:
        steps = np.diff(dist)
        dup = np.flatnonzero(steps < 1e-3)
        if dup.size:
            counts = np.unique(np.round(dist, 2), return_counts=True)[1]
            extra = (f" (every position occurs {counts[0]} times: several volumes such as echoes or "
                     f"time points share the series; export them separately)"
                     if counts.min() == counts.max() and counts[0] > 1 else "")
            raise InputDataError(
                f"{where} has duplicated slices at the same position ({dup.size} duplicate(s), first at "
                f"{dist[dup[0]]:.2f} mm along the slice normal){extra}; remove the duplicates or export "
                f"the series again")
        med = float(np.median(steps))
        gaps = np.flatnonzero(steps > MISSING_GAP_FACTOR * med)
        if gaps.size:
            n_missing = int(round(float(np.sum(steps[gaps] / med - 1))))
            raise InputDataError(
                f"{where} is missing {max(n_missing, 1)} slice(s): a {steps[gaps[0]]:.2f} mm gap after "
                f"slice {gaps[0] + 1} of {len(files)} where the spacing is {med:.2f} mm; "
                f"export the complete series again")
        if np.max(np.abs(steps - med)) > max(SPACING_REL_TOL * med, 0.01):
            raise InputDataError(
                f"{where} has irregular slice spacing ({steps.min():.2f} to {steps.max():.2f} mm); "
                f"it cannot be loaded as one regular volume, resample it on the scanner or export it again")
        step_vec = (pos[-1] - pos[0]) / (len(files) - 1)
        in_plane = step_vec - (step_vec @ normal) * normal
        if np.linalg.norm(in_plane) * (len(files) - 1) > 0.5 * float(min(ps)):
            raise InputDataError(
                f"{where} is acquired with a tilted gantry or sheared slice stack; reconstruct it without "
                f"tilt (or correct the tilt) before loading")
        slice_spacing = med
    else:
        st = _number(headers[0].get("SpacingBetweenSlices")) or _number(headers[0].get("SliceThickness"))
        slice_spacing = float(st) if st and st > 0 else 1.0
    direction = np.column_stack([row, col, normal])
    spacing = np.array([float(ps[1]), float(ps[0]), slice_spacing])
    return files, headers, pos[0], spacing, direction


def _release_pixels(ds) -> None:
    """Drop a slice's pixel bytes from its cached header (they are re-read from the file if needed)."""
    if "PixelData" in ds:
        del ds.PixelData
    for attr in ("_pixel_array", "_pixel_id"):
        if hasattr(ds, attr):
            setattr(ds, attr, None if attr == "_pixel_array" else {})


def _stored_pixels(ds) -> np.ndarray:
    """Stored (not rescaled) pixels of one single-frame slice; uncompressed data without a copy."""
    if "PixelData" not in ds:
        import pydicom

        ds = pydicom.dcmread(ds.filename)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", bits) or bits)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    simple = (ts is not None and not ts.is_compressed and ts.is_little_endian and bits in (8, 16, 32)
              and int(ds.get("SamplesPerPixel", 1)) == 1 and int(ds.get("NumberOfFrames", 1) or 1) == 1
              and (stored == bits or not signed))
    if not simple:
        try:
            return ds.pixel_array
        except (NotImplementedError, RuntimeError, ImportError):
            return _pixels_with_gdcm(ds.filename)
    rows, cols = int(ds.Rows), int(ds.Columns)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    data = ds.PixelData
    if data is None or len(data) < rows * cols * dtype.itemsize:
        raise ValueError(f"pixel data holds {0 if data is None else len(data)} bytes, expected "
                         f"{rows * cols * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if stored < bits:
        arr = arr & dtype.type((1 << stored) - 1)
    return arr


def _read_pixels(info: DicomSeriesInfo, files: list[str], headers: list, b_text: str = "",
                 progress=None, should_cancel=None) -> np.ndarray:
    """Rescaled voxel values, array[k, j, i]; integer dtype when the rescale keeps integers."""
    raws, slopes, intercepts = [], [], []
    for n, (f, ds) in enumerate(zip(files, headers)):
        if should_cancel is not None and should_cancel():
            raise InputDataError("loading the DICOM series was cancelled")
        if progress is not None and n % 20 == 0:
            progress(n / len(files), f"reading {info.description or 'DICOM'} slice {n + 1}/{len(files)}")
        try:
            arr = np.array(_stored_pixels(ds), copy=True)
            _release_pixels(ds)
        except InputDataError:
            raise
        except Exception as exc:
            raise InputDataError(
                f"series {info.label}{b_text}: file {os.path.basename(f)} is truncated or corrupt "
                f"({type(exc).__name__}); export the series again") from exc
        if arr.ndim != 2:
            raise InputDataError(
                f"series {info.label}{b_text}: file {os.path.basename(f)} is a multi-frame or colour image "
                f"(shape {arr.shape}); only single-frame greyscale slices are supported")
        raws.append(arr)
        slopes.append(_number(ds.get("RescaleSlope")) or 1.0 if "RescaleSlope" in ds else 1.0)
        intercepts.append(_number(ds.get("RescaleIntercept")) or 0.0 if "RescaleIntercept" in ds else 0.0)
    raw = np.stack(raws)
    slopes = np.asarray(slopes, float)
    intercepts = np.asarray(intercepts, float)
    identity = np.all(slopes == 1.0) and np.all(intercepts == 0.0)
    if identity:
        return raw
    integral = np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    if integral:
        out = raw.astype(np.int64) * slopes.astype(np.int64)[:, None, None] + intercepts.astype(np.int64)[:, None, None]
        lo, hi = int(out.min()), int(out.max())
        for dt in (np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return out.astype(dt)
        return out.astype(np.float64)
    return (raw.astype(np.float64) * slopes[:, None, None] + intercepts[:, None, None]).astype(np.float32)


def _pixels_with_gdcm(path: str) -> np.ndarray:
    """Raw stored pixels of a compressed slice through SimpleITK's GDCM (no rescale)."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(path)
    r.SetImageIO("GDCMImageIO")
    img = r.Execute()
    arr = sitk.GetArrayFromImage(img)
    # GDCM applies the rescale itself; undo it so that the caller's per-slice rescale stays correct.
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    slope = _number(ds.get("RescaleSlope")) or 1.0
    inter = _number(ds.get("RescaleIntercept")) or 0.0
    if slope != 1.0 or inter != 0.0:
        arr = np.round((arr.astype(np.float64) - inter) / slope).astype(np.int32)
    return arr.reshape(arr.shape[-2:]) if arr.ndim == 3 and arr.shape[0] == 1 else arr


def _units(info: DicomSeriesInfo, first) -> str:
    it = [t.upper() for t in info.image_type]
    if "ADC" in it or "EADC" in it or re.search(r"(^|[^a-z])adc([^a-z]|$)", info.description.lower()):
        return ADC_UNITS
    if info.modality == "CT":
        return "HU"
    return _text(first.get("RescaleType")) or _text(first.get((0x0028, 0x1054)))


def _build_volume(info: DicomSeriesInfo, files: list[str], headers: list, b_value: float | None,
                  progress=None, should_cancel=None) -> RasVolume:
    b_text = f" (b = {b_value:g})" if b_value is not None else ""
    files, headers, origin_lps, spacing, direction = _sorted_geometry(info, files, headers, b_text)
    array = _read_pixels(info, files, headers, b_text, progress, should_cancel)
    if array.shape[1:] != (info.rows, info.columns):
        raise InputDataError(f"series {info.label}{b_text}: pixel data size {array.shape[1:]} does not match "
                             f"the header ({info.rows} x {info.columns}); the files are corrupt")
    m = ijk_to_ras_from_lps_geometry(origin_lps, spacing, direction)
    first = headers[0]
    meta = {
        "series_description": info.description,
        "series_number": info.number,
        "series_uid": info.uid,
        "study_uid": info.study_uid,
        "modality": info.modality,
        "acquisition_date": info.acquisition_date,
        "acquisition_time": info.acquisition_time,
        "image_type": list(info.image_type),
        "frame_of_reference_uid": info.frame_of_reference_uid,
        "flip_angle": info.flip_angle,
        "trigger_time_ms": info.trigger_time_ms,
        "units": _units(info, first),
        "slice_thickness_mm": _number(first.get("SliceThickness")),
        "n_slices": int(array.shape[0]),
        "source_path": os.path.dirname(files[0]),
    }
    position = _text(first.get("PatientPosition")).upper()
    if position:
        meta["patient_position"] = position  # HFS/FFS/HFP/FFP...: the prior of capsule-free fusion
    if b_value is not None:
        meta["b_value"] = float(b_value)
    name = _sanitise(info.description or f"series_{info.number}")
    if b_value is not None:
        name += f"_b{b_value:g}"
    logger.info("loaded DICOM series %s%s: %s voxels, spacing %s mm", info.label, b_text,
                "x".join(map(str, array.shape[::-1])), np.round(spacing, 3).tolist())
    return RasVolume(array, m, name, meta)


def _sanitise(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
    return s or "series"


def _group_by_b(info: DicomSeriesInfo, res: _ScanResult):
    groups: dict = defaultdict(list)
    for f in info.files:
        groups[dicom_b_value(res.headers[f])].append(f)
    return groups


def _resolve(path, series_uid):
    """(scan result, series); a file path selects that file's series from its folder."""
    path = os.fspath(path)
    if os.path.isfile(path):
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            uid = _text(ds.get("SeriesInstanceUID"))
        except Exception as exc:
            raise InputDataError(f"{path} is not a readable DICOM file ({type(exc).__name__}); "
                                 f"choose a DICOM file or folder") from exc
        if not uid:
            raise InputDataError(f"{path} is not a DICOM image (no series UID); choose a DICOM file or folder")
        series_uid = series_uid or uid
        path = os.path.dirname(path) or "."
    res = _scan(path)
    info = _select_series(res, path, series_uid)
    _refuse_corrupt(res, path)
    return res, info


def _refuse_corrupt(res: _ScanResult, path) -> None:
    """A broken file may be a slice of the series being loaded: never load around it silently."""
    if not res.corrupt:
        return
    first = os.path.relpath(res.corrupt[0], path) if os.path.isdir(path) else os.path.basename(res.corrupt[0])
    others = f" (and {len(res.corrupt) - 1} more)" if len(res.corrupt) > 1 else ""
    where = f"series {next(iter(res.series.values())).label}: " if len(res.series) == 1 else f"{path}: "
    raise InputDataError(f"{where}file {first}{others} is truncated or corrupt (its DICOM header cannot be "
                         f"read); export the series again or remove the broken file")


def load_dicom_series(path, series_uid: str | None = None, b_value: float | None = None,
                      progress: Callable | None = None, should_cancel: Callable | None = None) -> RasVolume:
    """Load one DICOM series (or one b-value of a multi-b DWI series) as a RAS volume.

    ``path``: a folder (searched recursively) or one file of the series. ``series_uid`` is needed
    when the folder holds several series; ``b_value`` (s/mm^2) when the series holds several b-values.
    Values are rescaled (RescaleSlope/Intercept); geometry is IJK->RAS in mm.
    """
    res, info = _resolve(path, series_uid)
    return _load_from_scan(res, info, b_value, progress, should_cancel)


def _load_from_scan(res: _ScanResult, info: DicomSeriesInfo, b_value=None, progress=None,
                    should_cancel=None) -> RasVolume:
    groups = _group_by_b(info, res)
    if b_value is None:
        if len(groups) > 1:
            raise InputDataError(
                f"series {info.label} holds several b-values ({_fmt_b(sorted(k for k in groups if k is not None))} "
                f"s/mm^2); choose one b-value or load it as a DWI series")
        key = next(iter(groups))
    else:
        key = next((k for k in groups if k is not None and abs(k - float(b_value)) < 0.5), "missing")
        if key == "missing":
            raise InputDataError(f"series {info.label} has no b = {float(b_value):g} s/mm^2 images "
                                 f"(it has {_fmt_b(sorted(k for k in groups if k is not None)) or 'none'})")
    files = groups[key]
    return _build_volume(info, files, [res.headers[f] for f in files], key, progress, should_cancel)


def load_dwi_series(path, series_uid: str | None = None, progress: Callable | None = None,
                    should_cancel: Callable | None = None) -> dict[float, RasVolume]:
    """Every b-value of a DWI series: {b (s/mm^2): RasVolume}, sorted by b.

    Without ``series_uid`` the folder must hold exactly one series with b-values (other series, e.g.
    an ADC map or T2, are ignored). The b-value volumes are checked to share one grid.
    """
    res, info = None, None
    if series_uid is None and os.path.isdir(os.fspath(path)):
        res = _scan(path)
        dwi = [s for s in res.series.values() if s.b_values]
        if not dwi:
            if not res.series:
                _select_series(res, path, None)  # raises the empty / not-DICOM / corrupt error
            raise InputDataError(f"no diffusion-weighted series (with b-values) found in {path}; found: "
                                 f"{_series_list_text(res.series.values())}")
        if len(dwi) > 1:
            raise InputDataError(f"{path} holds {len(dwi)} DWI series ({_series_list_text(dwi)}); choose one")
        info = dwi[0]
        _refuse_corrupt(res, path)
    else:
        res, info = _resolve(path, series_uid)
    return _load_dwi_from_scan(res, info, progress, should_cancel)


def _load_dwi_from_scan(res: _ScanResult, info: DicomSeriesInfo, progress=None,
                        should_cancel=None) -> dict[float, RasVolume]:
    groups = _group_by_b(info, res)
    if None in groups:
        if len(groups) == 1:
            raise InputDataError(f"series {info.label} has no diffusion b-value in its headers; "
                                 f"it is not a DWI series or its b-values were removed on export")
        raise InputDataError(f"series {info.label} mixes images with and without b-values; export the DWI "
                             f"series again")
    out: dict[float, RasVolume] = {}
    keys = sorted(groups)
    for n, b in enumerate(keys):
        sub = None
        if progress is not None:
            sub = (lambda f, msg, n=n: progress((n + f) / len(keys), msg))
        files = groups[b]
        out[float(b)] = _build_volume(info, files, [res.headers[f] for f in files], b, sub, should_cancel)
    ref = out[keys[0]]
    for b, v in out.items():
        if not v.same_grid(ref, tol=1e-3):
            raise InputDataError(f"series {info.label}: the b = {b:g} images do not cover the same slices as "
                                 f"b = {keys[0]:g}; export the complete DWI series again")
    return out


# ------------------------------------------------------------------------------------------------
# write
# ------------------------------------------------------------------------------------------------
@dataclass
class _Rescale:
    dtype: type
    slope: float
    intercept: float

    def store(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        info = np.iinfo(self.dtype)
        if self.slope == 1.0 and self.intercept == 0.0 and np.issubdtype(values.dtype, np.integer):
            if values.dtype == self.dtype:
                return values
            return np.clip(values, info.min, info.max).astype(self.dtype)
        v = (values.astype(np.float64) - self.intercept) / self.slope
        np.rint(v, out=v)
        np.clip(v, info.min, info.max, out=v)
        return v.astype(self.dtype)


def _choose_rescale(arrays) -> _Rescale:
    lo = min(float(np.min(a)) for a in arrays)
    hi = max(float(np.max(a)) for a in arrays)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputDataError("the volume holds NaN or infinite values; replace them before writing DICOM")
    integral = all(np.issubdtype(a.dtype, np.integer) or bool(np.all(a == np.round(a))) for a in arrays)
    if integral and lo >= -32768 and hi <= 32767:
        return _Rescale(np.int16, 1.0, 0.0)
    if integral and lo >= 0 and hi <= 65535:
        return _Rescale(np.uint16, 1.0, 0.0)
    span = hi - lo
    slope = span / 65000.0 if span > 0 else 1.0
    # a short decimal slope keeps the DS string exact
    slope = float(f"{slope:.6g}")
    intercept = float(f"{lo:.6g}")
    if intercept > lo:
        intercept -= slope
    return _Rescale(np.uint16, slope, intercept)


def _ds_str(v: float) -> str:
    """DICOM DS string (max 16 characters) of a float."""
    for p in range(10, 3, -1):
        s = f"{v:.{p}g}"
        if len(s) <= 16:
            return s
    return f"{v:.4g}"


def _uid(seed: str | None, *parts) -> str:
    from pydicom.uid import generate_uid

    if seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=[str(seed), *map(str, parts)])


def _grid_lps(volume: RasVolume):
    origin, spacing, direction = lps_geometry_from_ijk_to_ras(volume.ijk_to_ras)
    row, col, kdir = direction[:, 0], direction[:, 1], direction[:, 2]
    normal = np.cross(row, col)
    if abs(float(row @ col)) > 1e-4 or abs(abs(float(kdir @ normal)) - 1.0) > 1e-4:
        raise InputDataError(f"volume '{volume.name}' has a sheared grid (slice axis not perpendicular to the "
                             f"slices); resample it on an orthogonal grid before writing DICOM")
    return origin, spacing, direction


def write_dicom_series(volume: RasVolume, out_dir, *, modality: str = "CT", series_description: str = "",
                       series_number: int = 1, patient_id: str = "PHANTOM", patient_name: str | None = None,
                       study_uid: str | None = None, series_uid: str | None = None,
                       frame_of_reference_uid: str | None = None, study_description: str = "SmartBiopsy",
                       b_value: float | None = None, acquisition_datetime: _dt.datetime | None = None,
                       uid_seed: str | None = None, file_prefix: str = "IMG",
                       flip_angle: float | None = None) -> list[str]:
    """Write ``volume`` as a DICOM series (one file per slice) into ``out_dir``; returns the file paths.

    ``modality`` 'CT' (CT Image Storage; values in HU) or 'MR' (MR Image Storage). Values are stored as
    int16 (integer data that fits) or uint16 with RescaleSlope/Intercept (a precision of range/65000).
    Geometry comes from ``volume.ijk_to_ras`` converted to LPS by SmartBiopsyCoreLib.geometry; a
    volume whose k axis points against row x column is read back with its slices in reverse order
    (same voxel positions in space). ``b_value`` (s/mm^2) is written to DiffusionBValue (0018,9087)
    and the Siemens B_value (0019,100C). ``uid_seed`` makes every UID deterministic. ``flip_angle``
    (degrees, MR) is written to FlipAngle; ``acquisition_datetime`` sets the series' acquisition time (the
    frames of a DCE written as separate series differ in it, see ``group_time_series``).
    """
    return _write_series([(b_value, volume)], out_dir, modality=modality, series_description=series_description,
                         series_number=series_number, patient_id=patient_id, patient_name=patient_name,
                         study_uid=study_uid, series_uid=series_uid,
                         frame_of_reference_uid=frame_of_reference_uid, study_description=study_description,
                         acquisition_datetime=acquisition_datetime, uid_seed=uid_seed, file_prefix=file_prefix,
                         flip_angle=flip_angle)


def write_dwi_series(volumes: dict[float, RasVolume], out_dir, *, series_description: str = "DWI",
                     series_number: int = 1, patient_id: str = "PHANTOM", patient_name: str | None = None,
                     study_uid: str | None = None, series_uid: str | None = None,
                     frame_of_reference_uid: str | None = None, study_description: str = "SmartBiopsy",
                     acquisition_datetime: _dt.datetime | None = None, uid_seed: str | None = None,
                     file_prefix: str = "DWI") -> list[str]:
    """Write a multi-b DWI as ONE MR series: {b (s/mm^2): volume}, all volumes on the same grid.

    Each image carries its b-value in (0018,9087) and the Siemens (0019,100C); one rescale is shared by
    all b-values. Returns the file paths.
    """
    if not volumes:
        raise InputDataError("no DWI volumes were given to write")
    items = sorted(((float(b), v) for b, v in volumes.items()), key=lambda t: t[0])
    ref = items[0][1]
    for b, v in items[1:]:
        if not v.same_grid(ref, tol=1e-4):
            raise InputDataError(f"the b = {b:g} volume is not on the same grid as the b = {items[0][0]:g} "
                                 f"volume; resample the DWI volumes onto one grid before writing")
    return _write_series(items, out_dir, modality="MR", series_description=series_description,
                         series_number=series_number, patient_id=patient_id, patient_name=patient_name,
                         study_uid=study_uid, series_uid=series_uid,
                         frame_of_reference_uid=frame_of_reference_uid, study_description=study_description,
                         acquisition_datetime=acquisition_datetime, uid_seed=uid_seed, file_prefix=file_prefix)


def _save_dataset(ds, path) -> None:
    """Write ``ds`` as a DICOM Part 10 file (preamble + file meta, explicit VR little endian) with pydicom 2.4
    (Slicer 5.10 bundles 2.4.4) or 3.x: ``enforce_file_format`` exists only in 3.x, 2.4 reads the encoding
    from ``is_little_endian``/``is_implicit_VR``, which 3.x deprecates."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def person_name(text: str) -> str:
    """``text`` as a DICOM person name (PN, PS3.5 6.2.1.2): unchanged when it already has components (``^``),
    else a single family-name component marked as intended by a trailing caret ("PHANTOM0000" -> "PHANTOM0000^").
    Without the caret a single-component name is ambiguous, and DICOM libraries warn about it."""
    text = str(text).strip()
    return text if "^" in text or not text else text + "^"


def _write_series(items, out_dir, *, modality, series_description, series_number, patient_id, patient_name,
                  study_uid, series_uid, frame_of_reference_uid, study_description, acquisition_datetime,
                  uid_seed, file_prefix, flip_angle=None) -> list[str]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise InputDataError(f"DICOM modality must be 'CT' or 'MR', not '{modality}'")
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    os.makedirs(out_dir, exist_ok=True)
    rescale = _choose_rescale([v.array for _, v in items])
    when = acquisition_datetime or _dt.datetime(2024, 1, 1, 12, 0, 0)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")[:13]
    seed = None if uid_seed is None else f"{uid_seed}|{series_description}|{series_number}"
    study_uid = study_uid or _uid(uid_seed, "study")
    series_uid = series_uid or _uid(seed, "series")
    for_uid = frame_of_reference_uid or _uid(uid_seed, "frame")
    paths = []
    instance = 0
    for b, vol in items:
        if vol.array.ndim != 3:
            raise InputDataError(f"volume '{vol.name}' must be 3-D to be written as a DICOM series")
        origin, spacing, direction = _grid_lps(vol)
        row, col, kdir = direction[:, 0], direction[:, 1], direction[:, 2]
        nk, nj, ni = vol.array.shape
        stored = rescale.store(vol.array)
        iop = [_ds_str(float(x)) for x in (*row, *col)]
        # attributes shared by every slice are set once; the loop sets the per-slice ones and writes
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        if b is not None:
            ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"]
        ds.SOPClassUID = sop_class
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "SmartBiopsy"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.PatientName = person_name(patient_name or patient_id)
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.PatientPosition = str(vol.meta.get("patient_position") or "HFS").upper()
        ds.SliceThickness = _ds_str(float(spacing[2]))
        if modality == "CT":
            ds.KVP = ""
        else:
            ds.ScanningSequence = "EP" if b is not None else "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime = ""
            ds.RepetitionTime = ""
            ds.EchoTrainLength = ""
            ds.MagneticFieldStrength = "1.5"
            ds.SpacingBetweenSlices = _ds_str(float(spacing[2]))
            if flip_angle is not None:
                ds.FlipAngle = _ds_str(float(flip_angle))
            if b is not None:
                ds.SequenceName = f"*ep_b{b:g}t"
                ds.add_new((0x0018, 0x9087), "FD", float(b))
                ds.add_new((0x0019, 0x0010), "LO", SIEMENS_MR_CREATOR)
                ds.add_new((0x0019, 0x100C), "IS", str(int(round(b))))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.ImageOrientationPatient = iop
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = nj
        ds.Columns = ni
        ds.PixelSpacing = [_ds_str(float(spacing[1])), _ds_str(float(spacing[0]))]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if rescale.dtype == np.int16 else 0
        ds.RescaleIntercept = _ds_str(rescale.intercept)
        ds.RescaleSlope = _ds_str(rescale.slope)
        ds.RescaleType = "HU" if modality == "CT" else "US"
        for k in range(nk):
            instance += 1
            ipp = origin + k * spacing[2] * kdir
            sop_uid = _uid(seed, "sop", instance)
            meta.MediaStorageSOPInstanceUID = sop_uid
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = instance
            ds.ImagePositionPatient = [_ds_str(float(x)) for x in ipp]
            ds.SliceLocation = _ds_str(float(ipp @ np.cross(row, col)))
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            path = os.path.join(out_dir, f"{file_prefix}{instance:05d}.dcm")
            _save_dataset(ds, path)
            paths.append(path)
    logger.info("wrote %d %s DICOM files of '%s' to %s", len(paths), modality, series_description, out_dir)
    return paths


# ------------------------------------------------------------------------------------------------
# study intake: series that are not volumes, and series that are frames of one time series
# ------------------------------------------------------------------------------------------------
_LOCALIZER_RE = re.compile(r"locali[sz]er|scout|survey|topogram|scanogram|tri[-_ ]?pilot|3[-_ ]?plane|"
                           r"(^|[^a-z])loc([^a-z]|$)|aahead", re.IGNORECASE)
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: A DCE needs at least this many frames (two series of one description are more often a repeat).
MIN_DYNAMIC_FRAMES = 3


def unusable_reason(info: DicomSeriesInfo, headers: dict) -> str | None:
    """Why a series cannot be one image volume of the case, from its headers alone (None: load it).

    Localizers/scouts (ImageType LOCALIZER or a localizer-like description), series whose images have
    several orientations (three-plane localizers, reformats), secondary captures and colour images.
    ``headers`` maps file -> header dataset (as from the scan).
    """
    it = {t.upper() for t in info.image_type}
    if "LOCALIZER" in it or _LOCALIZER_RE.search(info.description or ""):
        return "a localizer (scout) for planning the acquisition, not a diagnostic volume"
    iops = set()
    for f in info.files:
        iop = headers[f].get("ImageOrientationPatient")
        if iop is not None and len(iop) == 6:
            iops.add(tuple(np.round([float(v) for v in iop], 3)))
    if len(iops) > 1:
        return f"its images have {len(iops)} different orientations (a localizer or a set of reformats), not one volume"
    if info.sop_class_uid.startswith(_SECONDARY_CAPTURE):
        return "a secondary capture (screenshot), not an image volume"
    if info.samples_per_pixel != 1:
        return "a colour image (screenshot or overlay), not a greyscale volume"
    return None


def acquisition_seconds(info: DicomSeriesInfo) -> float | None:
    """Acquisition date+time of a series in seconds (any epoch, for differences), or None."""
    t = (info.acquisition_time or "").strip()
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?$", t.replace(":", ""))
    if not m:
        return None
    h, mi, se = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    frac = float(m.group(4)) if m.group(4) else 0.0
    day = 0.0
    d = (info.acquisition_date or "").strip()
    if re.match(r"^\d{8}$", d):
        day = (_dt.date(int(d[:4]), int(d[4:6]), int(d[6:])) - _dt.date(1970, 1, 1)).days * 86400.0
    return day + h * 3600.0 + mi * 60.0 + se + frac


@dataclass
class TimeSeriesInfo:
    """Several DICOM series that are the frames of ONE acquisition (found by :func:`group_time_series`).

    ``kind``: ``"DCE"`` (dynamic contrast-enhanced: same sequence repeated in time; ``times_s`` from the
    first frame) or ``"VFA"`` (variable flip angle T1 mapping: same sequence at several flip angles).
    ``series`` are ordered by time (DCE) or flip angle (VFA).
    """

    kind: str
    description: str
    frame_of_reference_uid: str
    series: list[DicomSeriesInfo]
    times_s: list[float]
    flip_angles: list[float | None]

    @property
    def label(self) -> str:
        what = {"DCE": "dynamic contrast-enhanced series", "VFA": "variable-flip-angle T1 series"}[self.kind]
        extra = (f"{len(self.series)} frames over {self.times_s[-1]:.0f} s" if self.kind == "DCE" else
                 "flip angles " + "/".join(f"{a:g}" for a in self.flip_angles if a is not None) + " deg")
        return f"'{self.description or 'unnamed'}' ({what}, {extra})"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "description": self.description, "label": self.label,
                "frame_of_reference_uid": self.frame_of_reference_uid, "n_frames": len(self.series),
                "series_numbers": [s.number for s in self.series], "times_s": list(self.times_s),
                "flip_angles": list(self.flip_angles)}


def group_time_series(series) -> list[TimeSeriesInfo]:
    """Find the time series among separately stored series.

    Series are grouped by (series description, frame of reference, modality, matrix, number of images);
    a group whose flip angles differ is a variable-flip-angle (VFA) set; a group of at least
    :data:`MIN_DYNAMIC_FRAMES` series with one flip angle and distinct acquisition times (or trigger
    times) is a DCE, ordered by time. Multi-b DWI and groups without times are left alone.
    """
    groups: dict = defaultdict(list)
    for s in series:
        if s.b_values or not s.frame_of_reference_uid:
            continue
        groups[(s.description, s.frame_of_reference_uid, s.modality, s.rows, s.columns, s.n_files)].append(s)
    out = []
    for (desc, frame, *_), members in groups.items():
        if len(members) < 2:
            continue
        angles = {round(s.flip_angle, 1) for s in members if s.flip_angle is not None}
        times = [acquisition_seconds(s) for s in members]
        if len(angles) > 1:
            members = sorted(members, key=lambda s: (s.flip_angle is None, s.flip_angle or 0.0))
            t = [acquisition_seconds(s) for s in members]
            t0 = min((x for x in t if x is not None), default=None)
            out.append(TimeSeriesInfo("VFA", desc, frame, members,
                                      [0.0 if x is None or t0 is None else x - t0 for x in t],
                                      [s.flip_angle for s in members]))
            continue
        if len(members) < MIN_DYNAMIC_FRAMES:
            continue
        if any(t is None for t in times) or len(set(np.round(times, 3))) != len(members):
            trig = [s.trigger_time_ms for s in members]
            if any(t is None for t in trig) or len(set(trig)) != len(members):
                continue
            times = [t / 1000.0 for t in trig]
        order = np.argsort(times, kind="stable")
        members = [members[i] for i in order]
        times = [float(times[i] - times[order[0]]) for i in order]
        out.append(TimeSeriesInfo("DCE", desc, frame, members, times, [s.flip_angle for s in members]))
    return out

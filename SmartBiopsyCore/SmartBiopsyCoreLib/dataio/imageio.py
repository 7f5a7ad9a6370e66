"""Load and save images of any supported kind as RAS volumes (core: no ``slicer``).

- A DICOM folder (or one file of a series) goes through :mod:`SmartBiopsyCoreLib.dataio.dicomio`.
- NRRD (.nrrd/.nhdr), NIfTI (.nii/.nii.gz), MetaImage (.mha/.mhd) files go through SimpleITK; their LPS
  geometry is converted to RAS by ``SmartBiopsyCoreLib.geometry`` only.

``RasVolume.meta`` of a NRRD/MetaImage written by :func:`save_image` is stored in the file (key
``smartbiopsy_meta`` as JSON) and restored by :func:`load_image`.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from SmartBiopsyCoreLib.geometry import RasVolume

from SmartBiopsyCoreLib.dataio import dicomio
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)

#: File name endings read and written through SimpleITK.
IMAGE_EXTENSIONS = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd")
_META_KEY = "smartbiopsy_meta"


def image_extension(path) -> str | None:
    """The supported image extension of ``path`` ('.nii.gz', '.nrrd', ...) or None."""
    low = os.fspath(path).lower()
    return next((e for e in IMAGE_EXTENSIONS if low.endswith(e)), None)


def _stem(path) -> str:
    base = os.path.basename(os.fspath(path))
    ext = image_extension(base)
    return base[: -len(ext)] if ext else os.path.splitext(base)[0]


def sanitise_name(text: str) -> str:
    """A key/node-name-safe version of a series description: letters, digits and underscores."""
    s = re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_")
    return s or "image"


def _check_3d(vol: RasVolume, what: str, require_3d: bool) -> RasVolume:
    if require_3d and min(vol.array.shape) < 2:
        raise InputDataError(f"{what} is a 2-D image ({vol.array.shape[2]} x {vol.array.shape[1]} pixels, "
                             f"{vol.array.shape[0]} slice); a 3-D volume is needed here, load the whole series")
    return vol


def _load_file(path: str, require_3d: bool) -> RasVolume:
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        img = reader.Execute()
    except RuntimeError as exc:
        from SmartBiopsyCoreLib.interruption import raise_if_interrupted

        raise_if_interrupted()  # Ctrl-C while reading: not a corrupt file
        raise InputDataError(f"{path} could not be read as an image (the file is corrupt, truncated or not a "
                             f"{image_extension(path)} image); check the file") from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputDataError(f"{path} holds {img.GetNumberOfComponentsPerPixel()} values per voxel (colour or "
                             f"vector image); a scalar volume is needed")
    if img.GetDimension() > 3:
        size = img.GetSize()
        if all(s == 1 for s in size[3:]):
            img = img[(slice(None),) * 3 + (0,) * (img.GetDimension() - 3)]
        else:
            raise InputDataError(f"{path} is a {img.GetDimension()}-D image (size {size}); split it into 3-D "
                                 f"volumes first")
    meta = {}
    if reader.HasMetaDataKey(_META_KEY):
        try:
            meta = json.loads(reader.GetMetaData(_META_KEY))
        except ValueError:
            logger.warning("ignoring unreadable %s in %s", _META_KEY, path)
    meta.setdefault("source_path", os.path.abspath(path))
    vol = RasVolume.from_sitk(img, name=_stem(path), meta=meta)
    return _check_3d(vol, path, require_3d)


def load_image(path, require_3d: bool = True, series_uid: str | None = None, b_value: float | None = None,
               progress: Callable | None = None, should_cancel: Callable | None = None) -> RasVolume:
    """One volume from a DICOM folder/file or a NRRD/NIfTI/MetaImage file, in RAS mm.

    A DICOM folder must hold a single series (else the error lists the series; pass ``series_uid``);
    a multi-b DWI series needs ``b_value``. ``require_3d``: reject single-slice images.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputDataError(f"{path} does not exist; check the path")
    if os.path.isdir(path):
        vol = dicomio.load_dicom_series(path, series_uid, b_value, progress, should_cancel)
        return _check_3d(vol, f"series {vol.meta.get('series_description')!r} in {path}", require_3d)
    if os.path.getsize(path) == 0:
        raise InputDataError(f"{path} is empty (0 bytes); copy the file again")
    if image_extension(path):
        return _load_file(path, require_3d)
    if dicomio._is_dicom_file(path) or path.lower().endswith((".dcm", ".ima")):
        vol = dicomio.load_dicom_series(path, series_uid, b_value, progress, should_cancel)
        return _check_3d(vol, f"series {vol.meta.get('series_description')!r}", require_3d)
    raise InputDataError(f"{os.path.basename(path)} is not a supported image (use a DICOM folder or a "
                         f"{', '.join(IMAGE_EXTENSIONS)} file)")


def save_image(volume: RasVolume, path, compress: bool = True) -> str:
    """Write ``volume`` to a NRRD/NIfTI/MetaImage file chosen by the extension; returns the path.

    NRRD and MetaImage keep ``volume.meta`` (JSON). For a DICOM series use
    :func:`SmartBiopsyCoreLib.dataio.dicomio.write_dicom_series`.
    """
    import SimpleITK as sitk

    path = os.fspath(path)
    ext = image_extension(path)
    if ext is None:
        raise InputDataError(f"cannot save to {os.path.basename(path)}: use one of {', '.join(IMAGE_EXTENSIONS)} "
                             f"(DICOM is written with write_dicom_series)")
    img = volume.to_sitk()
    if ext in (".nrrd", ".nhdr", ".mha", ".mhd") and volume.meta:
        img.SetMetaData(_META_KEY, jsonio.dumps(volume.meta, default=str))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        sitk.WriteImage(img, path, compress)
    except RuntimeError as exc:
        from SmartBiopsyCoreLib.interruption import raise_if_interrupted

        raise_if_interrupted()  # Ctrl-C while writing: not a full disk
        raise InputDataError(f"could not write {path} ({str(exc).strip().splitlines()[-1][:120]}); "
                             f"check the folder is writable and has space") from exc
    return path


@dataclass
class SkippedSeries:
    """A series (or image file) of a study folder that was not loaded, and why (one sentence)."""

    label: str
    reason: str
    where: str = ""

    def to_dict(self) -> dict:
        return {"series": self.label, "reason": self.reason, "where": self.where}


@dataclass
class TimeSeries:
    """The frames of one time series stored as separate DICOM series (a DCE, or a variable-flip-angle set).

    ``frames`` share one grid (RAS); ``times_s`` are seconds from the first frame; ``flip_angles`` degrees.
    """

    name: str
    kind: str                     # "DCE" or "VFA"
    description: str
    frames: list
    times_s: list
    flip_angles: list
    label: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "description": self.description, "label": self.label,
                "n_frames": len(self.frames), "times_s": [round(float(t), 3) for t in self.times_s],
                "flip_angles": list(self.flip_angles),
                "size_ijk": list(self.frames[0].array.shape[::-1]) if self.frames else []}


@dataclass
class StudyIntake:
    """What :func:`load_study_intake` found in a study folder: volumes, time series and skipped series."""

    path: str
    volumes: dict = field(default_factory=dict)        # {name: RasVolume}
    time_series: dict = field(default_factory=dict)    # {name: TimeSeries}
    skipped: list = field(default_factory=list)        # [SkippedSeries]

    def to_dict(self) -> dict:
        vols = {k: {"series": v.meta.get("series_description", ""), "series_number": v.meta.get("series_number"),
                    "modality": v.meta.get("modality", ""), "b_value": v.meta.get("b_value"),
                    "size_ijk": list(v.array.shape[::-1]),
                    "source_path": v.meta.get("source_path", "")} for k, v in self.volumes.items()}
        return {"path": self.path, "volumes": vols,
                "time_series": {k: t.to_dict() for k, t in self.time_series.items()},
                "skipped": [s.to_dict() for s in self.skipped]}


def load_study(path, progress: Callable | None = None,
               should_cancel: Callable | None = None) -> dict[str, RasVolume]:
    """Every usable volume below a folder: {sanitised name: RasVolume} (see :func:`load_study_intake`;
    skipped series are logged, time series are not included)."""
    return load_study_intake(path, progress, should_cancel).volumes


def load_study_intake(path, progress: Callable | None = None,
                      should_cancel: Callable | None = None) -> StudyIntake:
    """Every volume and time series below a study folder (symbolic links followed), and what was skipped.

    DICOM series are keyed by their sanitised series description (a multi-b DWI series gives one entry
    per b-value, '<description>_b800'); image files by their file name without extension. Duplicate
    names get the series number (or a counter) appended. Series stored separately that are the frames of
    one DCE or variable-flip-angle acquisition (same description and frame of reference, distinct
    acquisition times or flip angles: ``dicomio.group_time_series``) become one :class:`TimeSeries`.
    Localizers, multi-orientation series, screenshots, single images and series that cannot be read are
    skipped, each with its reason; only a folder without any usable series (or with a corrupt DICOM file
    whose series is unknown) is an error.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        if os.path.exists(path):
            vol = load_image(path)
            return StudyIntake(path, {sanitise_name(vol.name): vol})
        raise InputDataError(f"{path} does not exist (neither a folder nor a file); check the path")
    intake = StudyIntake(path)
    out = intake.volumes

    def put(store: dict, key: str, item, number=None):
        key = sanitise_name(key)
        if key in store and number is not None:
            key = f"{key}_s{number}"
        base, n = key, 2
        while key in store:
            key, n = f"{base}_{n}", n + 1
        item.name = key
        store[key] = item
        return key

    def where(info) -> str:
        return os.path.dirname(info.files[0]) if info.files else ""

    image_files = [f for f in dicomio.walk_files(path) if image_extension(f)]
    res = dicomio._scan(path)
    if not res.series and not image_files:
        dicomio._select_series(res, path, None)  # raises the right "empty / not DICOM / corrupt" error
    dicomio._refuse_corrupt(res, path)
    series = sorted(res.series.values(), key=lambda s: (s.number if s.number is not None else 1 << 30))
    usable = []
    for info in series:
        reason = dicomio.unusable_reason(info, res.headers)
        if reason:
            intake.skipped.append(SkippedSeries(info.label, reason, where(info)))
        else:
            usable.append(info)
    groups = dicomio.group_time_series(usable)
    grouped = {s.uid for g in groups for s in g.series}
    total = len(usable) + len(image_files)
    done = 0

    def tick(message):
        if should_cancel is not None and should_cancel():
            raise InputDataError("loading the study was cancelled")
        if progress is not None:
            progress(done / max(total, 1), message)

    for info in usable:
        if info.uid in grouped:
            continue
        tick(f"loading {info.description or info.uid}")
        try:
            if info.is_multi_b:
                for b, vol in dicomio._load_dwi_from_scan(res, info, should_cancel=should_cancel).items():
                    put(out, f"{info.description or 'dwi'}_b{b:g}", vol, info.number)
            else:
                vol = dicomio._load_from_scan(res, info, should_cancel=should_cancel)
                if min(vol.array.shape) < 2:
                    intake.skipped.append(SkippedSeries(info.label, "a single image (one slice), not a volume",
                                                        where(info)))
                else:
                    put(out, info.description or f"series_{info.number}", vol, info.number)
        except InputDataError as exc:
            if "cancelled" in str(exc):
                raise
            intake.skipped.append(SkippedSeries(info.label, str(exc), where(info)))
        done += 1
    for g in groups:
        tick(f"loading {g.label}")
        try:
            frames = [dicomio._load_from_scan(res, info, should_cancel=should_cancel) for info in g.series]
            bad = next((f for f in frames[1:] if not f.same_grid(frames[0], tol=1e-3)), None)
            if bad is not None:
                raise InputDataError(f"frame '{bad.meta.get('series_number')}' is not on the grid of the first "
                                     f"frame; the frames cannot form one time series")
        except InputDataError as exc:
            if "cancelled" in str(exc):
                raise
            intake.skipped.append(SkippedSeries(g.label, str(exc), where(g.series[0])))
            continue
        ts = TimeSeries("", g.kind, g.description, frames, list(g.times_s), list(g.flip_angles), g.label)
        key = put(intake.time_series, f"{g.description or 'dynamic'}_{g.kind}", ts)
        for n, f in enumerate(frames):
            f.name = f"{key}_{n:03d}"
            f.meta["time_series"] = key
            f.meta["time_s"] = float(g.times_s[n])
        done += len(g.series)
    for f in image_files:
        tick(f"loading {os.path.basename(f)}")
        try:
            put(out, _stem(f), _load_file(f, require_3d=False))
        except InputDataError as exc:
            intake.skipped.append(SkippedSeries(os.path.basename(f), str(exc), os.path.dirname(f)))
        done += 1
    for s in intake.skipped:
        logger.warning("skipped %s: %s", s.label, s.reason)
    if not out and not intake.time_series:
        listed = "; ".join(f"{s.label}: {s.reason}" for s in intake.skipped[:6])
        raise InputDataError(f"no usable image series in {path} ({listed}); choose the folder of the study")
    if progress is not None:
        progress(1.0, f"loaded {len(out)} volumes, {len(intake.time_series)} time series")
    logger.info("loaded study %s: %s", path, ", ".join([*out, *intake.time_series]))
    return intake


def load_time_series(path, kind: str = "DCE", progress: Callable | None = None,
                     should_cancel: Callable | None = None) -> TimeSeries:
    """The one ``kind`` time series ("DCE" or "VFA") below ``path`` (its frames stored as separate series).

    Raises :class:`InputDataError` naming what was found when there is none or more than one.
    """
    intake = load_study_intake(path, progress, should_cancel)
    found = [t for t in intake.time_series.values() if t.kind == kind]
    if len(found) == 1:
        return found[0]
    what = "; ".join(t.label for t in intake.time_series.values()) or "no time series"
    if not found:
        raise InputDataError(f"no {kind} time series (at least {dicomio.MIN_DYNAMIC_FRAMES} series of one description "
                             f"and frame of reference with distinct acquisition times) was found in {path} ({what}); "
                             f"choose the folder of the dynamic series")
    raise InputDataError(f"{path} holds {len(found)} {kind} time series ({what}); choose the folder of one of them")

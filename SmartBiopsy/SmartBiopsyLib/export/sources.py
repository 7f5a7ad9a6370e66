"""The source series an exported object references: an original DICOM series on exactly the object's grid,
or, when the case has none (volumes given as NRRD/NIfTI), a derived source series written next to the export
and labelled as such. Derived sources get fresh UIDs that are never presented as the patient's originals:
their series description says so and the manifest lists what could not be referenced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import logging

import numpy as np

from SmartBiopsyCoreLib.geometry import RasVolume, lps_to_ras_points

logger = logging.getLogger(__name__)

DERIVED_NOTE = ("no original DICOM series on this grid was found; a derived source series was written from the "
                "case volume with newly generated UIDs (it is NOT the patient's original series)")


@dataclass
class SourceSeries:
    """Single-frame source images sorted by slice (``slice_index[n]`` = k of image n in the volume grid).

    ``origin`` 'original' (found in a DICOM folder) or 'derived' (written by the export); ``note`` says why."""

    kind: str
    datasets: list
    slice_index: list
    origin: str
    folder: str
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def first(self):
        return self.datasets[0]

    def to_dict(self) -> dict:
        ds = self.first
        return {"kind": self.kind, "origin": self.origin, "folder": self.folder, "note": self.note,
                "study_instance_uid": str(ds.StudyInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID),
                "frame_of_reference_uid": str(getattr(ds, "FrameOfReferenceUID", "")),
                "modality": str(getattr(ds, "Modality", "")),
                "series_description": str(getattr(ds, "SeriesDescription", "")), "images": len(self.datasets)}


def _read_headers(folder: Path) -> list:
    import pydicom

    out = []
    for p in sorted(Path(folder).rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        if hasattr(ds, "ImagePositionPatient") and hasattr(ds, "ImageOrientationPatient") and "SeriesInstanceUID" in ds:
            ds.filename = str(p)
            out.append(ds)
    return out


def _match(volume: RasVolume, headers: list, tol_vox: float = 0.02):
    """Images of ONE series covering ``volume``'s grid one image per slice, or None. Where a series holds several
    images per position (multi-b DWI), the one with the lowest b-value / instance number is taken."""
    nz, ny, nx = volume.array.shape
    ras_to_ijk = np.linalg.inv(volume.ijk_to_ras)
    by_pos: dict = {}
    for ds in headers:
        if int(ds.Rows) != ny or int(ds.Columns) != nx:
            return None
        iop = np.asarray(ds.ImageOrientationPatient, float)
        pos_ras = lps_to_ras_points(np.asarray(ds.ImagePositionPatient, float)[None])[0]
        ijk = (ras_to_ijk @ np.r_[pos_ras, 1.0])[:3]
        # row direction (along columns index) must be +i, column direction +j
        row_ras = lps_to_ras_points(iop[None, :3])[0]
        col_ras = lps_to_ras_points(iop[None, 3:])[0]
        di = volume.ijk_to_ras[:3, 0] / np.linalg.norm(volume.ijk_to_ras[:3, 0])
        dj = volume.ijk_to_ras[:3, 1] / np.linalg.norm(volume.ijk_to_ras[:3, 1])
        if np.abs(row_ras - di).max() > 1e-3 or np.abs(col_ras - dj).max() > 1e-3:
            return None
        if abs(ijk[0]) > tol_vox or abs(ijk[1]) > tol_vox or abs(ijk[2] - round(ijk[2])) > tol_vox:
            return None
        by_pos.setdefault(int(round(ijk[2])), []).append(ds)
    if sorted(by_pos) != list(range(nz)):
        return None

    def rank(ds):
        b = ds.get((0x0018, 0x9087))
        return (float(b.value) if b is not None and b.value is not None else 0.0, int(getattr(ds, "InstanceNumber", 0) or 0))

    chosen = [min(by_pos[k], key=rank) for k in range(nz)]
    return chosen


def find_original(volume: RasVolume, folders, kind: str) -> SourceSeries | None:
    """A series in ``folders`` (DICOM folders, searched recursively) lying exactly on ``volume``'s grid; among several,
    a diffusion series (the ADC's own acquisition: images with a b-value) is preferred, then the first found."""
    found = []
    for folder in folders or []:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        headers = _read_headers(folder)
        series: dict = {}
        for ds in headers:
            series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
        for uid, items in series.items():
            chosen = _match(volume, items)
            if chosen is not None:
                dwi = any(d.get((0x0018, 0x9087)) is not None for d in items)
                found.append((0 if dwi else 1, len(found), uid, folder, items, chosen))
    if not found:
        return None
    _rank, _n, uid, folder, items, chosen = min(found, key=lambda f: (f[0], f[1]))
    note = "original series on the same grid"
    if len(chosen) < len(items):
        note += f" ({len(chosen)} of its {len(items)} images: one per slice, lowest b-value)"
    logger.info("export: %s references series %s in %s", kind, uid, folder)
    return SourceSeries(kind, chosen, list(range(len(chosen))), "original", str(folder), note)


def write_derived(volume: RasVolume, folder: Path, kind: str, modality: str, patient_id: str,
                  study_uid: str | None = None, frame_of_reference_uid: str | None = None,
                  series_number: int = 900) -> SourceSeries:
    """Write ``volume`` as a derived source series (fresh UIDs, description says it is derived) and read it back."""
    from SmartBiopsyCoreLib.dataio.dicomio import write_dicom_series

    folder = Path(folder)
    if folder.exists():
        for p in folder.glob("*"):
            if p.is_file():
                p.unlink()
    pixels = volume
    if volume.array.dtype.itemsize < 2 or volume.array.dtype == bool:
        # small integer types (label maps) are widened: the series writer's rescale expects at least 16 bits
        pixels = volume.with_array(volume.array.astype(np.int16))
    elif np.issubdtype(volume.array.dtype, np.floating) and not np.isfinite(volume.array).all():
        # a map undefined outside the body (NaN): the derived source image shows 0 there
        pixels = volume.with_array(np.nan_to_num(volume.array, nan=0.0, posinf=0.0, neginf=0.0))
    write_dicom_series(pixels, folder, modality=modality,
                       series_description=f"SmartBiopsy derived source ({kind}; not an original series)",
                       series_number=series_number, patient_id=patient_id, patient_name=patient_id,
                       study_uid=study_uid, frame_of_reference_uid=frame_of_reference_uid,
                       study_description="SmartBiopsy export (derived sources)")
    chosen = _match(volume, _read_headers(folder))
    if chosen is None:  # pragma: no cover - the writer and the matcher disagree
        raise RuntimeError(f"the derived {kind} source series does not lie on the volume grid")
    return SourceSeries(kind, chosen, list(range(len(chosen))), "derived", str(folder), DERIVED_NOTE)


def source_for(volume: RasVolume, folders, kind: str, modality: str, derived_dir: Path, patient_id: str,
               study_uid: str | None = None) -> SourceSeries:
    """An original series on ``volume``'s grid, else a derived one written under ``derived_dir``."""
    found = find_original(volume, folders, kind)
    if found is not None:
        return found
    return write_derived(volume, Path(derived_dir) / kind, kind, modality, patient_id, study_uid=study_uid)


def volume_slices(volume: RasVolume, source: SourceSeries) -> np.ndarray:
    """The volume's slices in the source images' order, shape (frames, rows, cols)."""
    return np.ascontiguousarray(volume.array[np.asarray(source.slice_index)])

"""ADC / FF / EF maps as DICOM Parametric Map objects (highdicom): float pixels with a real-world value mapping
naming the quantity and its UCUM unit (ADC um2/s = 1e-6 mm^2/s; FF and EF %), referencing the source series."""

from __future__ import annotations

from pathlib import Path
import logging

import numpy as np

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyLib.export.common import (DEVICE_SERIAL, MANUFACTURER, MODEL, QUANTITIES, ExportedObject, code,
                                          need_highdicom, software_version, unit)
from SmartBiopsyLib.export.sources import SourceSeries, volume_slices

logger = logging.getLogger(__name__)

LABELS = {"adc": "ADC", "ff": "FF", "ef": "EF"}


def write_parametric_map(volume, name: str, source: SourceSeries, path, *, series_number: int) -> ExportedObject:
    """Write map ``name`` ('adc', 'ff' or 'ef'; RasVolume on the source grid, project units) as a float32
    Parametric Map. Non-finite voxels (none in a computed map) are written as 0 and counted in the manifest."""
    hd = need_highdicom()
    from pydicom.uid import generate_uid

    key = name.lower()
    if key not in QUANTITIES:
        raise InputDataError(f"map '{name}' has no known quantity; export adc, ff or ef")
    arr = volume_slices(volume, source).astype(np.float32)
    bad = ~np.isfinite(arr)
    n_bad = int(bad.sum())
    if n_bad:
        arr = np.where(bad, 0.0, arr).astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        hi = lo + 1.0
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=LABELS[key], lut_explanation=code(*QUANTITIES[key]).meaning, unit=unit(key),
        value_range=(lo, hi), slope=1.0, intercept=0.0, quantity_definition=code(*QUANTITIES[key]))
    desc = f"{LABELS[key]} map ({unit(key).value})"
    pm = hd.pm.ParametricMap(
        source_images=source.datasets, pixel_array=arr, series_instance_uid=generate_uid(),
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=MODEL, software_versions=software_version(),
        device_serial_number=DEVICE_SERIAL, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], window_center=(lo + hi) / 2.0, window_width=hi - lo,
        content_label=LABELS[key], content_description=desc, series_description=desc)
    if "Laterality" not in pm:
        pm.Laterality = None  # General Series type 2C: present, empty (laterality not applicable)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pm.save_as(str(path))
    return ExportedObject(
        kind="pm", path=path.name, description=desc, sop_class_uid=str(pm.SOPClassUID),
        sop_instance_uid=str(pm.SOPInstanceUID), series_instance_uid=str(pm.SeriesInstanceUID),
        study_instance_uid=str(pm.StudyInstanceUID), references={"source": source.to_dict()},
        content={"map": key, "unit": unit(key).value, "frames": int(pm.NumberOfFrames),
                 "range": [lo, hi], "non_finite_voxels_written_as_0": n_bad})


def read_parametric_map(path) -> dict:
    """Read a Parametric Map back: {'values': (frames, rows, cols) float real-world values, 'unit', 'label',
    'quantity'} using the first real-world value mapping."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    raw = ds.pixel_array.astype(np.float64)  # FloatPixelData, DoubleFloatPixelData or integer PixelData
    raw = raw.reshape(int(getattr(ds, "NumberOfFrames", 1)), int(ds.Rows), int(ds.Columns))
    rwv = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    values = raw * float(rwv.RealWorldValueSlope) + float(rwv.RealWorldValueIntercept)
    u = rwv.MeasurementUnitsCodeSequence[0]
    q = rwv.QuantityDefinitionSequence[0].ConceptCodeSequence[0] if "QuantityDefinitionSequence" in rwv else None
    return {"values": values, "unit": str(u.CodeValue), "unit_scheme": str(u.CodingSchemeDesignator),
            "label": str(rwv.LUTLabel), "quantity": str(q.CodeMeaning) if q is not None else ""}

"""Radiomic features per habitat region with pyradiomics (parameters in ``radiomics_params.yaml``).

Defaults: original image only, first-order + shape + GLCM features, fixed bin width suited to each map's
units (ADC 50 x 10^-6 mm^2/s, EF 10 %, FF 2 %), no isotropic resampling. Regions too small for the
texture matrices (pyradiomics' ``minimumROISize``/``minimumROIDimensions``) give a row with a reason
instead of features; nothing stops the other regions. NaN voxels of a map are removed from the mask.

pyradiomics is optional (inside Slicer it comes with the SlicerRadiomics extension): without it every row
carries :data:`NOT_AVAILABLE` ("Radiomic features not available: install SlicerRadiomics ...") instead of
features, so the radiomics table says so and the rest of the characterisation completes.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from SmartBiopsyCoreLib.geometry import RasVolume
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.optional import MissingPackageError, missing_sentence, require

logger = logging.getLogger(__name__)

DEFAULT_PARAMS = Path(__file__).with_name("radiomics_params.yaml")
BIN_WIDTHS = {"adc": 50.0, "ef": 10.0, "ff": 2.0}
REGION_CODES = {"A": 1, "B": 2, "C": 3}
#: The row error when pyradiomics is not installed.
NOT_AVAILABLE = missing_sentence("radiomics", "Radiomic features")


@dataclass
class RadiomicsRow:
    region: str
    map_name: str
    voxel_count: int
    features: dict = field(default_factory=dict)
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _extractor(params_path, bin_width):
    radiomics = require("radiomics", "Radiomic features")
    from radiomics import featureextractor

    radiomics.setVerbosity(logging.ERROR)
    ex = featureextractor.RadiomicsFeatureExtractor(str(params_path))
    if bin_width is not None:
        ex.settings["binWidth"] = float(bin_width)
    return ex


def compute_radiomics(habitats: RasVolume, maps: Mapping[str, RasVolume], params_path=None,
                      progress: Callable | None = None, should_cancel: Callable | None = None) -> list[RadiomicsRow]:
    """One :class:`RadiomicsRow` per (region present, map). Maps must share the habitat grid.

    Without pyradiomics every row has ``error`` = :data:`NOT_AVAILABLE` and no features (nothing raises).
    """
    params_path = Path(params_path or DEFAULT_PARAMS)
    if not params_path.is_file():
        raise InputDataError(f"the radiomics parameter file {params_path} does not exist; give a valid YAML file")
    lab = np.asarray(habitats.array)
    rows = []
    jobs = [(r, c, n, v) for r, c in REGION_CODES.items() if np.any(lab == c) for n, v in maps.items()]
    for idx, (region, code, name, vol) in enumerate(jobs):
        if should_cancel and should_cancel():
            break
        if progress:
            progress(idx / max(len(jobs), 1), f"radiomics {region} / {name}")
        if not vol.same_grid(habitats):
            raise InputDataError(f"the {name} map is not on the habitat grid; resample the maps onto one grid first")
        arr = np.asarray(vol.array, np.float64)
        mask = (lab == code) & np.isfinite(arr)
        n = int(mask.sum())
        row = RadiomicsRow(region, name, n)
        try:
            ex = _extractor(params_path, BIN_WIDTHS.get(name.lower()))
        except MissingPackageError as exc:  # pyradiomics absent: say so in every row, stop nothing else
            row.error = str(exc)
            if not rows:
                logger.warning(row.error)
            rows.append(row)
            continue
        try:
            img = vol.with_array(np.where(np.isfinite(arr), arr, 0.0).astype(np.float32)).to_sitk()
            msk = vol.with_array(mask.astype(np.uint8)).to_sitk()
            result = ex.execute(img, msk, label=1)
            row.features = {k: float(np.asarray(v)) for k, v in result.items()
                            if not k.startswith("diagnostics") and np.ndim(np.asarray(v)) == 0}
        except (ValueError, RuntimeError) as exc:
            row.error = f"region {region} ({n} voxels) is too small or flat for radiomics on {name}: {exc}"
            logger.warning(row.error)
        rows.append(row)
    if progress:
        progress(1.0, "radiomics done")
    return rows


def write_radiomics_csv(rows: list[RadiomicsRow], path) -> str:
    """Long format CSV: region, map, voxel_count, feature, value, error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["region", "map", "voxel_count", "feature", "value", "error"])
        for r in rows:
            if r.error or not r.features:
                w.writerow([r.region, r.map_name, r.voxel_count, "", "", r.error])
            for k, v in r.features.items():
                w.writerow([r.region, r.map_name, r.voxel_count, k, repr(v), ""])
    return str(path)

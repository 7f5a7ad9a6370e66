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


#: voxels kept around a region's box for pyradiomics (more than its own ``padDistance``, 5 by default, so its
#: crop of the cropped image is the crop it makes of the whole one: the same features, much less to copy)
RADIOMICS_BOX_PAD = 8


def _region_box(mask: np.ndarray, pad: int) -> tuple:
    """(k, j, i) slices of the box of ``mask``'s voxels grown by ``pad`` voxels (clipped to the array)."""
    nz = [np.nonzero(mask.any(axis=ax))[0] for ax in ((1, 2), (0, 2), (0, 1))]
    return tuple(slice(max(int(a[0]) - pad, 0), min(int(a[-1]) + 1 + pad, n)) for a, n in zip(nz, mask.shape))


def _cropped(vol: RasVolume, box: tuple) -> RasVolume:
    """``vol`` cut to ``box`` ((k, j, i) slices) with the same world positions (its ijk->RAS shifted)."""
    shift = np.eye(4)
    shift[:3, 3] = [box[2].start, box[1].start, box[0].start]
    return RasVolume(np.asarray(vol.array)[box], np.asarray(vol.ijk_to_ras, float) @ shift, vol.name, dict(vol.meta))


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
    extractor = None  # one extractor (the parameter file is read and validated once), bin width set per map
    boxes: dict = {}  # each region's box: pyradiomics only reads the mask's box (plus its padding)
    shapes: dict = {}  # region code -> (mask, shape features): shape depends on the mask only, not on the map
    for idx, (region, code, name, vol) in enumerate(jobs):
        if should_cancel and should_cancel():
            break
        if progress:
            progress(idx / max(len(jobs), 1), f"radiomics {region} / {name}")
        if not vol.same_grid(habitats):
            raise InputDataError(f"the {name} map is not on the habitat grid; resample the maps onto one grid first")
        if code not in boxes:
            boxes[code] = _region_box(lab == code, pad=RADIOMICS_BOX_PAD)
        box = boxes[code]
        arr = np.asarray(vol.array[box], np.float64)
        mask = (lab[box] == code) & np.isfinite(arr)
        n = int(mask.sum())
        row = RadiomicsRow(region, name, n)
        try:
            if extractor is None:
                extractor = _extractor(params_path, None)
                default_bin_width = extractor.settings.get("binWidth")
            ex = extractor
            bw = BIN_WIDTHS.get(name.lower())
            ex.settings["binWidth"] = float(bw) if bw is not None else default_bin_width
        except MissingPackageError as exc:  # pyradiomics absent: say so in every row, stop nothing else
            row.error = str(exc)
            if not rows:
                logger.warning(row.error)
            rows.append(row)
            continue
        try:
            sub = _cropped(vol, box)
            img = sub.with_array(np.where(np.isfinite(arr), arr, 0.0).astype(np.float32)).to_sitk()
            msk = sub.with_array(mask.astype(np.uint8)).to_sitk()
            same = shapes.get(code)
            if same is not None and np.array_equal(same[0], mask):  # the region's shape is already measured
                enabled = ex.enabledFeatures
                ex.enabledFeatures = {k: v for k, v in enabled.items() if k != "shape"}
                try:
                    result = ex.execute(img, msk, label=1)
                finally:
                    ex.enabledFeatures = enabled
            else:
                result = ex.execute(img, msk, label=1)
                same = None
            feats = {k: float(np.asarray(v)) for k, v in result.items()
                     if not k.startswith("diagnostics") and np.ndim(np.asarray(v)) == 0}
            if same is None:
                shapes[code] = (mask, {k: v for k, v in feats.items() if "_shape_" in k})
                row.features = feats
            else:  # pyradiomics puts the shape features first
                row.features = {**same[1], **feats}
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

"""Radiomics per habitat region (pyradiomics) on a small synthetic map."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyLib.characterise import radiomics as radiomics_features
def test_radiomics_rows_per_region_and_small_region_reported(tmp_path):
    # without pyradiomics (Slicer without SlicerRadiomics) see test_optional_packages.py
    pytest.importorskip("radiomics", reason="pyradiomics is not installed here")
    grid = make_grid((0, 0, 0), (1.5, 1.5, 3.0), (12, 30, 30))
    lab = np.zeros((12, 30, 30), np.uint8)
    lab[2:10, 3:27, 3:15] = 1
    lab[2:10, 3:27, 15:27] = 3
    lab[5, 5, 5] = 2  # a single voxel: too small for texture matrices
    rng = np.random.default_rng(1)
    adc = np.where(lab == 1, 900.0, 1900.0) + rng.normal(0, 60, lab.shape)
    rows = radiomics_features.compute_radiomics(RasVolume(lab, grid), {"adc": RasVolume(adc.astype(np.float32), grid)})
    by = {r.region: r for r in rows}
    assert set(by) == {"A", "B", "C"}
    assert by["B"].error and not by["B"].features
    a, c = by["A"].features, by["C"].features
    assert abs(a["original_firstorder_Mean"] - 900.0) < 10 and abs(c["original_firstorder_Mean"] - 1900.0) < 10
    vol_a = a["original_shape_VoxelVolume"]
    assert abs(vol_a - (lab == 1).sum() * 1.5 * 1.5 * 3.0) < 1e-3 * vol_a
    assert any(k.startswith("original_glcm_") for k in a)
    path = radiomics_features.write_radiomics_csv(rows, tmp_path / "radiomics.csv")
    lines = list(csv.DictReader(open(path)))
    assert {ln["region"] for ln in lines} == {"A", "B", "C"} and len(lines) > 40

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


def test_radiomics_on_region_boxes_equal_pyradiomics_on_the_whole_maps():
    """Features computed on each region's box, with one extractor and the shape measured once per region,
    equal pyradiomics run on the whole maps with a fresh extractor per row (the map's own bin width); a map
    with a missing voxel in a region (its mask differs) gets its own shape features."""
    pytest.importorskip("radiomics", reason="pyradiomics is not installed here")
    from radiomics import featureextractor

    grid = make_grid((3, -2, 5), (1.5, 1.5, 3.0), (14, 40, 44))
    lab = np.zeros((14, 40, 44), np.uint8)
    lab[2:9, 4:20, 5:18] = 1
    lab[3:12, 22:36, 8:30] = 2
    lab[6:13, 5:30, 24:40] = 3
    rng = np.random.default_rng(4)
    maps = {"adc": 1200.0 + 300.0 * rng.standard_normal(lab.shape), "ef": 40.0 + 15.0 * rng.standard_normal(lab.shape),
            "ff": 5.0 + 3.0 * rng.standard_normal(lab.shape)}
    maps["ef"][6, 30, 20] = np.nan  # inside region B
    vols = {k: RasVolume(v.astype(np.float32), grid) for k, v in maps.items()}
    rows = radiomics_features.compute_radiomics(RasVolume(lab, grid), vols)
    assert len(rows) == 9 and not any(r.error for r in rows)
    for r in rows:
        arr = np.asarray(vols[r.map_name].array, np.float64)
        mask = (lab == radiomics_features.REGION_CODES[r.region]) & np.isfinite(arr)
        ex = featureextractor.RadiomicsFeatureExtractor(str(radiomics_features.DEFAULT_PARAMS))
        ex.settings["binWidth"] = radiomics_features.BIN_WIDTHS[r.map_name]
        img = vols[r.map_name].with_array(np.where(np.isfinite(arr), arr, 0.0).astype(np.float32)).to_sitk()
        res = ex.execute(img, vols[r.map_name].with_array(mask.astype(np.uint8)).to_sitk(), label=1)
        expected = {k: float(np.asarray(v)) for k, v in res.items()
                    if not k.startswith("diagnostics") and np.ndim(np.asarray(v)) == 0}
        assert list(r.features) == list(expected), (r.region, r.map_name)
        assert r.features == expected, (r.region, r.map_name)
        assert r.voxel_count == int(mask.sum())
    by = {(r.region, r.map_name): r.features for r in rows}
    assert by[("B", "ef")]["original_shape_VoxelVolume"] < by[("B", "adc")]["original_shape_VoxelVolume"]

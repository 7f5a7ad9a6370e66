"""Bad and edge-case input for maps, habitats and targets (small synthetic volumes)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyLib.characterise import habitats, maps, targets, tumour
from SmartBiopsyCoreLib.errors import InputDataError

GRID = make_grid((0, 0, 0), (2.0, 2.0, 3.0), (20, 30, 30))


def vol(arr, name="v", **meta):
    return RasVolume(np.asarray(arr, np.float32), GRID.copy(), name, dict(meta))


def synthetic_dwi(adc_um2=1200.0, bvals=(0, 400, 800), s0=1000.0, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    body = np.zeros((20, 30, 30), bool)
    body[3:17, 5:25, 5:25] = True
    out = {}
    for b in bvals:
        s = np.where(body, s0 * np.exp(-b * adc_um2 * 1e-6), 0.0)
        if noise:
            s = np.hypot(s + rng.normal(0, noise, s.shape), rng.normal(0, noise, s.shape))
        out[float(b)] = vol(s, f"b{b}", b_value=float(b))
    return out, body


@pytest.mark.parametrize("method", ["wlls", "ols"])
def test_adc_recovers_known_value_with_noise(method):
    dwi, body = synthetic_dwi(1500.0, noise=5.0)
    adc = maps.compute_adc(dwi, method=method)
    assert np.nanmedian(adc.array[body]) == pytest.approx(1500.0, rel=0.02)
    assert np.isnan(adc.array[~body]).mean() > 0.95
    assert adc.meta["units"] == "1e-6 mm^2/s"


def test_adc_excluding_low_b_ignores_perfusion():
    dwi, body = synthetic_dwi(1000.0, bvals=(0, 50, 400, 800))
    dwi[0.0] = dwi[0.0].with_array(dwi[0.0].array * 1.3)  # pseudo-diffusion excess at b = 0
    full = np.nanmedian(maps.compute_adc(dwi, method="ols").array[body])
    hi = np.nanmedian(maps.compute_adc(dwi, method="ols", exclude_low_b=True).array[body])
    assert hi == pytest.approx(1000.0, rel=0.01) and full > 1050.0


def test_adc_rejects_single_b_value():
    dwi, _ = synthetic_dwi(bvals=(800,))
    with pytest.raises(InputDataError, match="at least two"):
        maps.compute_adc(dwi)
    dwi, _ = synthetic_dwi(bvals=(50, 800))
    with pytest.raises(InputDataError, match="at least two"):
        maps.compute_adc(dwi, exclude_low_b=True)


def test_adc_rejects_negative_and_empty_signal():
    dwi, _ = synthetic_dwi()
    dwi[400.0] = dwi[400.0].with_array(dwi[400.0].array - 500.0)
    with pytest.raises(InputDataError, match="negative"):
        maps.compute_adc(dwi)
    dwi, _ = synthetic_dwi()
    dwi[0.0] = dwi[0.0].with_array(np.zeros_like(dwi[0.0].array))
    with pytest.raises(InputDataError, match="empty"):
        maps.compute_adc(dwi)


def test_adc_zero_signal_voxels_are_left_out_not_infinite():
    dwi, body = synthetic_dwi()
    a = dwi[800.0].array.copy()
    a[10, 15, 15] = 0.0
    dwi[800.0] = dwi[800.0].with_array(a)
    adc = maps.compute_adc(dwi)
    assert np.isnan(adc.array[10, 15, 15])
    assert np.all(np.isfinite(adc.array[body & (np.arange(30)[None, None, :] != 15)]))


def test_mismatched_grids_raise_without_transform_and_resample_with_one():
    dwi, body = synthetic_dwi(1200.0)
    shifted = RasVolume(dwi[800.0].array, make_grid((1.0, 0, 0), (2.0, 2.0, 3.0), (20, 30, 30)), "b800",
                        {"b_value": 800.0})
    dwi[800.0] = shifted
    with pytest.raises(InputDataError, match="same voxel grid"):
        maps.compute_adc(dwi)
    # the b800 image content is truly 1 mm to the right: the identity tells resample where it is
    adc = maps.compute_adc(dwi, transforms={800.0: np.eye(4)})
    inner = np.zeros_like(body)
    inner[5:15, 8:22, 8:22] = True
    assert np.nanmedian(adc.array[inner]) == pytest.approx(1200.0, rel=0.01)


@pytest.mark.parametrize("scale,unit", [(1e-6, "mm\\^2/s"), (1e-3, "10\\^-3")])
def test_adc_unit_mistakes_are_detected(scale, unit):
    arr = np.full((20, 30, 30), 1100.0) * scale
    with pytest.raises(InputDataError, match=unit):
        maps.check_adc_units(vol(arr))
    fixed = maps.check_adc_units(vol(arr), allow_convert=True)
    assert np.median(fixed.array) == pytest.approx(1100.0, rel=1e-4)
    assert maps.check_adc_units(vol(np.full((20, 30, 30), 1100.0))).meta["units"] == "1e-6 mm^2/s"


def test_ff_and_ef_definitions_on_known_values():
    body = np.zeros((20, 30, 30), bool)
    body[2:18, 3:27, 3:27] = True
    water = vol(np.where(body, 700.0, 0.0))
    fat = vol(np.where(body, 300.0, 0.0))
    ff = maps.compute_ff(water, fat, on_swap="ignore")
    assert np.nanmedian(ff.array[body]) == pytest.approx(30.0, abs=1e-4)
    ef = maps.compute_ef(vol(np.where(body, 200.0, 0.0)), vol(np.where(body, 350.0, 0.0)))
    assert np.nanmedian(ef.array[body]) == pytest.approx(75.0, abs=1e-4)
    assert np.isnan(ef.array[~body]).all()


def _tumour_maps():
    """Box tumour: left half A (low ADC/high EF), right half C (high ADC/low EF), two discordant B slabs.

    Volumes are chosen so that both medians fall between compartments (ADC 1400, EF 70).
    """
    shape = (20, 30, 30)
    t = np.zeros(shape, bool)
    t[2:18, 3:27, 3:27] = True
    adc = np.full(shape, 1000.0)
    ef = np.full(shape, 120.0)
    adc[:, :, 15:] = 1900.0
    ef[:, :, 15:] = 20.0
    adc[:, 3:6, :], ef[:, 3:6, :] = 900.0, 20.0  # low ADC, low EF -> B
    adc[:, 24:27, :], ef[:, 24:27, :] = 1800.0, 130.0  # high ADC, high EF -> B
    ff = np.full(shape, 2.0)
    return vol(adc, "ADC"), vol(ef, "EF"), vol(ff, "FF"), t


def test_habitats_follow_the_median_rule_on_a_synthetic_tumour():
    adc, ef, ff, t = _tumour_maps()
    res = habitats.compute_habitats(adc, ef, ff, t, habitats.HabitatConfig(smooth_sigma_mm=0, min_region_ml=0.1))
    lab = res.labels.array
    assert lab[10, 15, 6] == 1 and lab[10, 15, 24] == 3 and lab[10, 4, 10] == 2 and lab[10, 25, 20] == 2
    assert res.thresholds == {"adc_median": pytest.approx(1400.0), "ef_median": pytest.approx(70.0)}
    assert {r.region for r in res.regions} == {"A", "B", "C"}
    a = next(r for r in res.regions if r.region == "A")
    assert a.adc_mean == pytest.approx(1000.0) and a.volume_ml == pytest.approx(a.voxel_count * 0.012)


def test_habitats_exclude_necrosis_and_fat_and_nan():
    adc, ef, ff, t = _tumour_maps()
    a, e, f = adc.array.copy(), ef.array.copy(), ff.array.copy()
    a[8:12, 12:18, 5:10], e[8:12, 12:18, 5:10] = 2900.0, 2.0  # necrosis
    f[8:12, 12:18, 20:25] = 80.0  # fat
    a[3, 20, 20] = np.nan
    res = habitats.compute_habitats(adc.with_array(a), ef.with_array(e), ff.with_array(f), t,
                                    habitats.HabitatConfig(smooth_sigma_mm=0, island_min_ml=0))
    lab = res.labels.array
    assert (lab[8:12, 12:18, 5:10] == 0).all() and (lab[8:12, 12:18, 20:25] == 0).all()
    assert res.excluded["necrosis"] == 4 * 6 * 5 and res.excluded["fat"] == 4 * 6 * 5
    assert res.excluded["invalid"] == 1 and lab[3, 20, 20] == 0


def test_missing_region_is_reported_and_others_returned():
    shape = (20, 30, 30)
    t = np.zeros(shape, bool)
    t[2:18, 3:27, 3:27] = True
    adc = np.where(np.arange(30)[None, None, :] < 15, 900.0, 1900.0) * np.ones(shape)
    ef = np.where(np.arange(30)[None, None, :] < 15, 130.0, 20.0) * np.ones(shape)
    res = habitats.compute_habitats(vol(adc), vol(ef), None, t, habitats.HabitatConfig(smooth_sigma_mm=0))
    assert {r.region for r in res.regions} == {"A", "C"}
    assert "B" in res.missing and "discordant" in res.missing["B"]
    ts = targets.plan_targets(res.labels, {"adc": vol(adc)})
    assert [x.region for x in ts] == ["A", "C"]


def test_empty_tumour_mask_and_mismatched_map_grid_raise():
    adc, ef, ff, t = _tumour_maps()
    with pytest.raises(InputDataError, match="empty"):
        habitats.compute_habitats(adc, ef, ff, np.zeros_like(t))
    with pytest.raises(InputDataError, match="empty"):
        tumour.measure_tumour(vol(np.zeros_like(t)))
    other = RasVolume(ef.array, make_grid((0, 0, 0), (1.0, 1.0, 1.0), (20, 30, 30)), "EF")
    with pytest.raises(InputDataError, match="grid"):
        habitats.compute_habitats(adc, other, ff, t)


def test_ellipsoid_volume_of_a_voxelised_ellipsoid():
    grid = make_grid((0, 0, 0), (1.0, 1.0, 2.0), (40, 80, 80))
    k, j, i = np.meshgrid(np.arange(40) * 2.0, np.arange(80), np.arange(80), indexing="ij")
    e = ((i - 40) / 30) ** 2 + ((j - 40) / 20) ** 2 + ((k - 40) / 15) ** 2 <= 1
    m = tumour.measure_tumour(RasVolume(e.astype(np.uint8), grid))
    assert m.dimensions_mm == pytest.approx([60, 40, 30], abs=2.5)
    assert m.ellipsoid_volume_ml == pytest.approx(np.pi / 6 * 60 * 40 * 30 / 1000, rel=0.08)
    assert m.voxel_volume_ml == pytest.approx(np.pi / 6 * 60 * 40 * 30 / 1000, rel=0.05)
    assert not m.eligible and "under 50 mm" in m.notes[0]


def test_target_depth_in_anisotropic_box_and_targetability_flag(tmp_path):
    grid = make_grid((0, 0, 0), (1.0, 1.0, 4.0), (15, 40, 40))
    lab = np.zeros((15, 40, 40), np.uint8)
    lab[2:13, 5:35, 5:35] = 1  # 30 x 30 x 44 mm: depth to the nearest face = 15 mm (in-plane)
    lab[5:8, 36:39, 36:39] = 2  # tiny region B: shallow
    ts = targets.plan_targets(RasVolume(lab, grid), predicted_tre_mm=lambda p: 1.5)
    a, b = ts
    assert a.depth_mm == pytest.approx(15.0, abs=1.0) and a.targetable
    assert not b.targetable and "not safely targetable" in b.reasons[0]
    assert b.required_depth_mm == pytest.approx(1.5 + 2.0 + 5.0)
    path = targets.write_targets_json(ts, tmp_path / "targets.json")
    data = json.loads(open(path).read())
    assert [t["region"] for t in data["targets"]] == ["A", "B"] and len(data["targets"][0]["point_ras"]) == 3

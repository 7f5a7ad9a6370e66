"""Maps, habitats and targets on the digital phantom's MRI against its ground truth."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from SmartBiopsyLib.characterise import habitats, maps, targets, tumour
@pytest.fixture(scope="module")
def case():
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom
    return generate_phantom(seed=0)


@pytest.fixture(scope="module")
def computed(case):
    mri = case.mri
    adc = maps.compute_adc({b: mri[f"dwi_b{int(b)}"] for b in case.truth.b_values})
    ff = maps.compute_ff(mri["dixon_water"], mri["dixon_fat"])
    ef = maps.compute_ef(mri["t1_pre"], mri["t1_post"])
    return adc, ff, ef


def _interior(case, code):
    return ndimage.binary_erosion(case.truth.mri_habitats.array == code)


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5])
def test_adc_and_ef_within_3_percent_of_truth_per_compartment(case, computed, code):
    adc, ff, ef = computed
    inside = _interior(case, code)
    assert inside.sum() > 100
    r_adc = np.nanmedian((adc.array[inside] - case.truth.adc.array[inside]) / case.truth.adc.array[inside])
    assert abs(r_adc) <= 0.03
    ef_true = case.truth.ef.array[inside]
    err_ef = np.nanmedian(ef.array[inside] - ef_true)
    assert abs(err_ef) <= 0.03 * max(float(np.median(ef_true)), 10.0)  # relative; absolute 0.3 points near zero EF


@pytest.mark.parametrize("code", [1, 2, 3, 4, 5])
def test_ff_within_3_points_of_truth_per_compartment(case, computed, code):
    """FF of lean tissue is 0-3 %, where a relative tolerance is meaningless: 3 percentage points."""
    adc, ff, ef = computed
    inside = _interior(case, code)
    err = np.nanmedian(ff.array[inside] - case.truth.ff.array[inside])
    assert abs(err) <= 3.0
    assert not ff.meta["swap_detected"]


def test_swapped_dixon_is_detected_and_corrected(case):
    mri = case.mri
    ff = maps.compute_ff(mri["dixon_fat"], mri["dixon_water"])
    assert ff.meta["swap_detected"] and ff.meta["swap_corrected"]
    inside = _interior(case, 1)
    assert abs(np.nanmedian(ff.array[inside] - case.truth.ff.array[inside])) <= 3.0
    with pytest.raises(maps.InputDataError, match="swapped"):
        maps.compute_ff(mri["dixon_fat"], mri["dixon_water"], on_swap="raise")


def test_tumour_volume_matches_truth(case):
    m = tumour.measure_tumour(case.truth.tumour_mask_mri)
    assert m.voxel_volume_ml == pytest.approx(case.truth.tumour_volume_ml, rel=0.05)
    assert m.ellipsoid_volume_ml == pytest.approx(m.voxel_volume_ml, rel=0.3)
    assert m.eligible


@pytest.mark.parametrize("mode", ["median", "kmeans"])
def test_habitats_dice_and_targets_in_true_habitat(case, computed, mode):
    adc, ff, ef = computed
    res = habitats.compute_habitats(adc, ef, ff, case.truth.tumour_mask_mri, habitats.HabitatConfig(mode=mode))
    truth = case.truth.mri_habitats.array
    for code in (1, 2, 3):
        a, b = res.labels.array == code, truth == code
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.8, f"{mode} region {code}: Dice {dice:.3f}"
    assert not np.isin(res.labels.array[np.isin(truth, (4, 5))], (1, 2, 3)).mean() > 0.1  # non-solid excluded
    assert {r.region for r in res.regions} == {"A", "B", "C"}
    ts = targets.plan_targets(res.labels, {"adc": adc, "ef": ef, "ff": ff})
    assert [t.region for t in ts] == ["A", "B", "C"]
    for t in ts:
        kji = np.round(res.labels.ras_to_ijk_points(t.point_ras)[0]).astype(int)[::-1]
        assert truth[tuple(kji)] == habitats.REGION_CODES[t.region]
        assert t.depth_mm >= 5.0 and t.targetable
    a_sig, c_sig = ts[0].signature, ts[2].signature
    assert a_sig["adc"]["mean"] < res.thresholds["adc_median"] < c_sig["adc"]["mean"]
    assert a_sig["ef"]["mean"] > res.thresholds["ef_median"] > c_sig["ef"]["mean"]

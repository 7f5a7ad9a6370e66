"""The digital phantom: geometry of the truth, consistency of the MRI signals with the map truth."""
from __future__ import annotations

import numpy as np
import pytest

from SmartBiopsyCoreLib.phantom.sarcoma import B_VALUES, HABITATS, LABELS, MRI_SERIES, generate_phantom
from scipy import ndimage


def _value_at(volume, ras):
    ijk = np.round(volume.ras_to_ijk_points(ras)).astype(int)
    return volume.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]]


def test_capsule_centres_lie_on_capsule_voxels_in_ct_and_mri(phantom0):
    t = phantom0.truth
    assert 6 <= len(t.capsules_ct) <= 8
    assert np.all(_value_at(phantom0.ct_labels, t.capsules_ct) == LABELS["capsule"])
    assert np.all(_value_at(t.mri_labels, t.capsules_mri) == LABELS["capsule"])
    # visible with a fat-like contrast in CT, bright on T2
    hu = _value_at(phantom0.ct, t.capsules_ct).astype(float)
    assert np.all((hu > -200) & (hu < -20))
    t2 = _value_at(phantom0.mri["t2"], t.capsules_mri)
    body_t2 = phantom0.mri["t2"].array[t.mri_labels.array == LABELS["muscle"]]
    assert np.all(t2 > 3 * np.median(body_t2))


def test_capsule_intensity_centroid_matches_truth_in_ct(phantom0):
    """The rendered capsules are where the truth says: air-subtracted intensity centroid within 0.3 mm."""
    ct = phantom0.ct
    errs = []
    for c in phantom0.truth.capsules_ct:
        ijk = np.round(ct.ras_to_ijk_points(c)[0]).astype(int)
        lo = np.maximum(ijk - np.array([8, 8, 5]), 0)
        sub = ct.array[lo[2]:ijk[2] + 6, lo[1]:ijk[1] + 9, lo[0]:ijk[0] + 9].astype(float)
        lab = phantom0.ct_labels.array[lo[2]:ijk[2] + 6, lo[1]:ijk[1] + 9, lo[0]:ijk[0] + 9]
        w = np.clip(sub + 1000.0, 0, None) * ndimage.binary_dilation(lab == LABELS["capsule"], iterations=2)
        w[lab == LABELS["fat"]] = 0  # exclude the skin the capsule rests on
        kji = np.argwhere(w > 0)
        centre_kji = (kji * w[w > 0][:, None]).sum(0) / w[w > 0].sum() + lo[::-1]
        errs.append(np.linalg.norm(ct.kji_to_ras_points(centre_kji)[0] - c))
    assert np.mean(errs) < 0.6, errs


def test_truth_transform_maps_mri_capsules_onto_ct_capsules(phantom0):
    t = phantom0.truth
    m = t.mri_to_ct
    mapped = t.capsules_mri @ m[:3, :3].T + m[:3, 3]
    assert np.max(np.linalg.norm(mapped - t.capsules_ct, axis=1)) < 0.5
    # a real rigid pose, not the identity
    assert np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-9)
    assert np.linalg.norm(m[:3, 3]) > 1.0 or np.degrees(np.arccos((np.trace(m[:3, :3]) - 1) / 2)) > 1.0


def test_adc_fitted_from_phantom_dwi_matches_truth_in_tumour(phantom0):
    """Independent log-linear fit over b = 50..800 (mono-exponential truth): within 2 % per compartment."""
    mri, t = phantom0.mri, phantom0.truth
    bs = np.array([b for b in B_VALUES if b > 0])
    logs = np.stack([np.log(np.maximum(mri[f"dwi_b{int(b)}"].array.astype(float), 1e-3)) for b in bs])
    bc = bs - bs.mean()
    slope = np.tensordot(bc, logs - logs.mean(axis=0), axes=(0, 0)) / (bc ** 2).sum()
    adc = -slope * 1e6
    hab = t.mri_habitats.array
    for code in (HABITATS["A"], HABITATS["B"], HABITATS["C"]):
        interior = ndimage.binary_erosion(hab == code, iterations=1)
        assert interior.sum() > 500
        rel = np.median(adc[interior] / t.adc.array[interior]) - 1.0
        assert abs(rel) < 0.02, (code, rel)


def test_dixon_and_t1_series_are_consistent_with_ff_and_ef_truth(phantom0):
    mri, t = phantom0.mri, phantom0.truth
    interior = ndimage.binary_erosion(t.tumour_mask_mri.array > 0, iterations=2)
    w, f = mri["dixon_water"].array[interior], mri["dixon_fat"].array[interior]
    ff = 100 * f / (w + f)
    fat_part = t.mri_habitats.array[interior] == HABITATS["fat"]
    assert abs(np.median(ff[fat_part]) - np.median(t.ff.array[interior][fat_part])) < 3.0
    pre, post = mri["t1_pre"].array[interior], mri["t1_post"].array[interior]
    solid_a = t.mri_habitats.array[interior] == HABITATS["A"]
    ef = 100 * (post - pre) / pre
    assert abs(np.median(ef[solid_a]) / np.median(t.ef.array[interior][solid_a]) - 1) < 0.03


def test_phantom_is_a_plausible_sarcoma_case(phantom0):
    t = phantom0.truth
    assert 1000 <= t.tumour_volume_ml <= 2100
    mri = phantom0.mri
    assert set(mri) == set(MRI_SERIES)
    assert np.allclose(mri["t2"].spacing, (1.5, 1.5, 6.0))
    assert np.allclose(phantom0.ct.spacing, (1.0, 1.0, 2.0))
    labels = phantom0.ct_labels.array
    for name in ("bone", "aorta", "ivc", "kidney", "bowel", "bowel_gas", "tumour", "table", "tube"):
        assert (labels == LABELS[name]).sum() > 100, name
    hab = phantom0.ct_habitats.array
    vol = {k: (hab == v).sum() for k, v in HABITATS.items() if v}
    # A and C balanced, so the median rule separates them
    assert 0.8 < vol["A"] / vol["C"] < 1.25
    assert vol["necrosis"] > 0 and vol["fat"] > 0
    # CT HU of tissues where a radiologist expects them
    ct = phantom0.ct.array
    assert abs(np.median(ct[labels == LABELS["fat"]]) + 100) < 15
    assert np.median(ct[labels == LABELS["bone"]]) > 400
    assert np.median(ct[labels == LABELS["bowel_gas"]]) < -800


@pytest.mark.slow
def test_phantom_is_deterministic_per_seed_and_varies_with_seed(phantom0):
    again = generate_phantom(0, cache=False)
    assert np.array_equal(again.ct.array, phantom0.ct.array)
    assert np.array_equal(again.truth.capsules_ct, phantom0.truth.capsules_ct)
    other = generate_phantom(5)
    assert not np.allclose(other.truth.mri_to_ct, phantom0.truth.mri_to_ct)
    assert other.truth.anatomy != phantom0.truth.anatomy


def test_deformed_mri_capsule_truth_is_consistent():
    case = generate_phantom(2, deformation=True)
    t = case.truth
    assert np.all(_value_at(t.mri_labels, t.capsules_mri) == LABELS["capsule"])
    m = t.mri_to_ct
    rigid = t.capsules_mri @ m[:3, :3].T + m[:3, 3]
    # the deformation is localised around the tumour: capsules move by less than its amplitude
    assert np.max(np.linalg.norm(rigid - t.capsules_ct, axis=1)) < 3.0

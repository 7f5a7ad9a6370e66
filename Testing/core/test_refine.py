"""Intensity refinement on the real RIRE head CT/T2 pair: MI gain, recovery of a known perturbation, acceptance checks."""
from __future__ import annotations

import numpy as np
import pytest

from RegistrationFusionLib.registration import refine as R
from RegistrationFusionLib.errors import RegistrationFusionError
from SmartBiopsyCoreLib.geometry import RasVolume
from RegistrationFusionLib.registration.landmarks import apply_transform, rotation_angle_deg


def rigid(axis, deg, t) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.radians(deg)
    m = np.eye(4)
    m[:3, :3] = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    m[:3, 3] = t
    return m


def _load_rire(shared_data, shrink):
    import SimpleITK as sitk

    d = shared_data / "rire-pat002"
    ct = RasVolume.from_sitk(sitk.Shrink(sitk.ReadImage(str(d / "pat002_ct.nrrd")), [shrink, shrink, 1]), "ct")
    mr = RasVolume.from_sitk(sitk.Shrink(sitk.ReadImage(str(d / "pat002_mr_T2.nrrd")), [shrink, shrink, 1]), "t2")
    return ct, mr


@pytest.fixture(scope="module")
def rire_full(shared_data):
    """The pair as shipped (CT 1.4 mm, MR 0.98 mm in-plane, 5 mm slices): for accuracy checks."""
    return _load_rire(shared_data, 1)


@pytest.fixture(scope="module")
def rire(shared_data):
    """In-plane resolution halved to keep the acceptance-logic tests fast."""
    return _load_rire(shared_data, 2)


@pytest.fixture(scope="module")
def rire_reference(rire):
    """Refinement of the small pair from a centre-of-mass start (no ground truth is shipped)."""
    ct, mr = rire
    start = R.moments_initialisation(ct, mr)
    return start, R.refine_registration(ct, mr, start)


def inner_box_points(vol: RasVolume, fraction=0.6) -> np.ndarray:
    lo, hi = vol.bounds_ras()
    c, h = (lo + hi) / 2, (hi - lo) / 2 * fraction
    return np.array([c + h * np.array([a, b, d]) for a in (-1, 1) for b in (-1, 1) for d in (-1, 1)] + [c])


def test_mutual_information_improves_over_identity_and_perturbed_start(rire, rire_reference):
    ct, mr = rire
    start, res = rire_reference
    mi_identity = R.mutual_information(ct, mr, np.eye(4))
    assert res.accepted, res.reason
    assert res.mi_final > mi_identity + 0.1
    perturbed = res.matrix @ rigid((0, 0, 1), 4, (5, -3, 4))
    mi_perturbed = R.mutual_information(ct, mr, perturbed)
    again = R.refine_registration(ct, mr, perturbed)
    assert again.mi_final > mi_perturbed + 0.05
    assert again.accepted


def test_recovers_known_rigid_perturbation_of_the_mri(rire_full):
    ct, mr = rire_full
    ref = R.refine_registration(ct, mr, R.moments_initialisation(ct, mr))
    p = rigid((1, 0.5, 0.2), 5, (6, -4, 5))  # moves the MRI world: x' = P x
    moved = RasVolume(mr.array, p @ mr.ijk_to_ras, "t2 moved")
    res = R.refine_registration(ct, moved, ref.matrix)  # starts 5 degrees / ~9 mm off
    recovered = res.matrix @ p  # should equal the reference registration of the unmoved MRI
    pts = inner_box_points(ct)
    err = np.linalg.norm(apply_transform(recovered, pts) - apply_transform(ref.matrix, pts), axis=1)
    assert err.max() < 2.0, err
    assert rotation_angle_deg(recovered @ np.linalg.inv(ref.matrix)) < 1.0


def test_keeps_landmark_result_when_capsules_would_move_too_far(rire, rire_reference):
    ct, mr = rire
    start, ref = rire_reference
    caps_mri = apply_transform(np.linalg.inv(ref.matrix), inner_box_points(ct)[:6])
    perturbed = ref.matrix @ rigid((0, 1, 0), 3, (3, 0, 2))
    res = R.refine_registration(ct, mr, perturbed, capsules_mri=caps_mri, capsule_allowed_mm=0.5,
                                targets_ct=inner_box_points(ct)[-1:])
    assert not res.accepted
    assert "capsule" in res.reason and "localisation error" in res.reason
    assert np.allclose(res.matrix, perturbed)
    assert res.capsule_displacement_mm.max() > 0.5
    assert len(res.target_displacement_mm) == 1 and res.target_displacement_mm[0] > 0.5
    assert res.to_dict()["accepted"] is False


def test_keeps_landmark_result_when_metric_does_not_improve(rire, rire_reference):
    ct, mr = rire
    _, ref = rire_reference
    res = R.refine_registration(ct, mr, ref.matrix, min_mi_gain=0.05)
    assert not res.accepted and "did not improve" in res.reason
    assert np.allclose(res.matrix, ref.matrix)


def test_deformable_stage_is_optional_and_checked(rire, rire_reference):
    ct, mr = rire
    _, ref = rire_reference
    res = R.refine_registration(ct, mr, ref.matrix, deformable=True, iterations=5, max_bending_energy=0.0,
                                bspline_grid_mm=80.0)
    assert not res.deformable_accepted
    # a zero bending-energy budget can only be met by doing nothing, which fails the metric check instead
    assert res.deformable_reason.startswith("deformable refinement rejected:")
    assert ("bending energy" in res.deformable_reason) or ("did not improve" in res.deformable_reason)
    assert {"mi_before", "mi_after", "bending_energy_mm2", "max_displacement_mm"} <= set(res.deformable_info)
    assert res.deformable_transform is None
    assert res.to_dict()["deformable"]["accepted"] is False
    plain = R.refine_registration(ct, mr, ref.matrix, iterations=5)
    assert plain.deformable_reason == "" and plain.deformable_transform is None


def test_transform_file_round_trip_is_exact(tmp_path):
    m = rigid((0.3, -1, 0.4), 17, (12.5, -40.25, 7.0))
    for ext in ("tfm", "h5"):
        path = tmp_path / f"mri_to_ct.{ext}"
        R.write_itk_transform(m, str(path))
        assert np.allclose(R.read_itk_transform(str(path)), m, atol=1e-6)


def test_itk_transform_maps_ct_points_to_mri_points_in_lps():
    m = rigid((0, 0, 1), 30, (10, 20, 30))
    tx = R.itk_from_ras(m)
    p_mri_ras = np.array([5.0, -7.0, 9.0])
    p_ct_ras = apply_transform(m, p_mri_ras)
    lps = lambda p: p * np.array([-1, -1, 1])  # noqa: E731 (test oracle only)
    assert np.allclose(tx.TransformPoint(tuple(lps(p_ct_ras))), lps(p_mri_ras), atol=1e-9)


def test_rejects_invalid_initial_transform_and_empty_mask(rire):
    ct, mr = rire
    with pytest.raises(RegistrationFusionError, match="not a valid 4x4"):
        R.refine_registration(ct, mr, np.zeros((4, 4)))
    with pytest.raises(RegistrationFusionError, match="mask"):
        R.refine_registration(ct, mr, np.eye(4), ct_mask=ct.with_array(np.zeros(ct.array.shape, np.uint8)))


def test_resample_mri_on_ct_grid(rire, rire_reference):
    ct, mr = rire
    _, ref = rire_reference
    out = R.resample_mri_on_ct(mr, ct, ref)
    assert out.same_grid(ct)
    assert np.count_nonzero(out.array) > 0.3 * out.array.size


def test_affine_stage_follows_rigid_and_reports_both(rire, rire_reference):
    ct, mr = rire
    _, ref = rire_reference
    res = R.refine_registration(ct, mr, ref.matrix @ rigid((0, 0, 1), 2, (2, 0, 0)), affine=True, iterations=40)
    assert [s.name for s in res.stages] == ["rigid", "affine"]
    assert res.stages[1].mi_before == pytest.approx(res.stages[0].mi_after)
    assert res.stages[1].mi_after >= res.stages[0].mi_after  # a stage that lowers MI is dropped
    a = res.candidate_matrix[:3, :3]
    assert np.all(np.abs(np.linalg.svd(a, compute_uv=False) - 1) < 0.1)  # plausible scaling/shear only


def test_metric_scores_a_regular_subset_of_at_most_max_samples_grid_points(rire, rire_reference):
    """SimpleITK's metric evaluation ignores the sampling settings, so mutual_information makes the regular subset
    itself: the cap and the fraction change the value, the same settings give the same value, and a cap above
    the number of grid points is the full evaluation."""
    ct, mr = rire
    _start, res = rire_reference
    n = ct.array.size
    full = R.mutual_information(ct, mr, res.matrix, max_samples=None)
    assert R.mutual_information(ct, mr, res.matrix, max_samples=n + 1) == full
    sub = R.mutual_information(ct, mr, res.matrix, max_samples=n // 8)
    assert sub != full
    assert R.mutual_information(ct, mr, res.matrix, max_samples=n // 8) == sub
    frac = R.mutual_information(ct, mr, res.matrix, sampling=1 / 8, max_samples=None)
    assert frac != full
    assert abs(sub - full) < 0.02 and abs(frac - full) < 0.02  # measured 0.007 and 0.004 nats on this pair
    # the subset still ranks a 2 mm / 2 degree misalignment below the refined transform
    off = res.matrix @ rigid((0, 0, 1), 2, (2, 0, 0))
    assert R.mutual_information(ct, mr, off, max_samples=n // 8) < sub - 0.01


def test_regular_subset_keeps_world_positions_and_the_sample_budget(rire):
    ct, mr = rire
    # an oblique, anisotropic grid (0.8 x 1.1 x 3 mm) with distinct values, so a wrong step or axis shows
    rng = np.random.default_rng(0)
    rot = rigid((1, 2, 3), 25, (0, 0, 0))[:3, :3]
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rot @ np.diag([0.8, 1.1, 3.0])
    ijk_to_ras[:3, 3] = (-40.0, 12.5, 7.0)
    vol = RasVolume(rng.integers(-1000, 1000, (24, 70, 90)).astype(np.int16), ijk_to_ras, "grid")
    mask = np.zeros(vol.array.shape, np.uint8)
    mask[2:-2, 10:-10, 10:-10] = 1
    mask_vol = vol.with_array(mask)
    target = int(mask.sum()) // 10
    sub, sub_mask = R._regular_subset(vol, mask_vol, target)
    assert sub_mask.same_grid(sub)
    assert target / 3 < np.count_nonzero(sub_mask.array) <= target
    steps = np.rint(sub.spacing / vol.spacing).astype(int)  # (i, j, k)
    assert len(set(steps.tolist())) > 1 and steps[2] == 1  # the 3 mm axis is the last one stepped
    # every sub-grid point is an original grid point with the same value
    kji = np.vstack([np.argwhere(sub.array == sub.array)[rng.choice(sub.array.size, 60, replace=False)],
                     np.array(sub.array.shape) - 1])
    world = sub.kji_to_ras_points(kji)
    ijk = np.rint(vol.ras_to_ijk_points(world)).astype(int)
    assert np.allclose(vol.ijk_to_ras_points(ijk.astype(float)), world, atol=1e-6)
    assert [vol.array[k, j, i] for i, j, k in ijk] == [sub.array[tuple(p)] for p in kji]
    assert [mask[k, j, i] for i, j, k in ijk] == [sub_mask.array[tuple(p)] for p in kji]
    assert R._regular_subset(vol, mask_vol, 10 * mask.sum())[0] is vol  # nothing to leave out
    assert R._regular_subset(vol, mask_vol, 10)[0] is vol  # too few points left for a histogram: all are scored
    assert R._regular_subset(vol, None, 10)[0] is vol
    assert R.mutual_information(ct, mr, np.eye(4), sampling=1e-9) == R.mutual_information(ct, mr, np.eye(4),
                                                                                           max_samples=None)


def test_local_refinement_reports_the_box_mutual_information_of_both_transforms(rire, rire_reference):
    from RegistrationFusionLib.registration import local_refine as L

    ct, mr = rire
    _start, res = rire_reference
    # a tumour-sized mask in the middle of the MRI (MRI grid), then its box on the CT
    tum = np.zeros(mr.array.shape, np.uint8)
    k, j, i = (s // 2 for s in mr.array.shape)
    tum[k - 2:k + 3, j - 15:j + 15, i - 15:i + 15] = 1
    tum_mri = mr.with_array(tum)
    m0 = res.matrix @ rigid((0, 0, 1), 1.5, (1.0, -1.0, 0.5))
    loc = L.refine_local(ct, mr, m0, tum_mri, engine="simpleitk")
    lo, hi, _pts = L.tumour_box_ct(tum_mri, m0, 15.0)
    box = L._crop(ct, lo, hi)
    assert loc.mi_landmark == R.mutual_information(box, mr, m0, bins=32)
    assert loc.mi_candidate == R.mutual_information(box, mr, loc.candidate_matrix, bins=32)


def test_masked_metric_equals_the_whole_image_evaluation_and_ignores_voxels_outside_the_mask(rire, rire_reference):
    """mutual_information cuts the CT to the mask's box; the value is SimpleITK's on the whole images."""
    ct, mr = rire
    _start, res = rire_reference
    mask = np.zeros(ct.array.shape, np.uint8)
    k, j, i = ct.array.shape
    mask[k // 4:3 * k // 4, j // 3:2 * j // 3, i // 4:i // 2] = 1
    mask_vol = ct.with_array(mask)
    reg = R._method(32, 1.0, 1, R._mask_image(mask_vol))
    reg.SetInitialTransform(R.itk_from_ras(res.matrix))
    whole = -float(reg.MetricEvaluate(R._float_image(ct), R._float_image(mr)))
    assert R.mutual_information(ct, mr, res.matrix, ct_mask=mask_vol) == pytest.approx(whole, abs=1e-12)
    outside = ct.array.copy()
    outside[0, 0, 0], outside[-1, -1, -1] = 5000, -3000   # extremes outside the mask change nothing
    assert R.mutual_information(ct.with_array(outside), mr, res.matrix, ct_mask=mask_vol) == pytest.approx(whole, abs=1e-12)


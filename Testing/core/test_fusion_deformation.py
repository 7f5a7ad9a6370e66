"""Fusion under soft-tissue deformation on the phantom: the true displacement is part of the truth, the local
refinement around the tumour runs with its acceptance check, and the predicted 95th-percentile error covers
the true error at the habitat targets (seeds here are not the benchmark's 100-109)."""
from __future__ import annotations

import numpy as np
import pytest

from RegistrationFusionLib.registration import landmarks as L
from RegistrationFusionLib.registration.error_model import predict_target_errors
from RegistrationFusionLib.registration.local_refine import local_contrast, refine_local
from RegistrationFusionLib.registration.pipeline import capsule_tolerance_mm, fuse_ct_mri


@pytest.fixture(scope="module")
def deformed2():
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

    return generate_phantom(2, deformation=True)


def test_deformed_truth_maps_mri_points_through_the_displacement(deformed2):
    t = deformed2.truth
    # the capsule truth was built by inverting p + d(p): mapping it forward lands on the CT capsules
    assert np.allclose(t.map_mri_to_ct(t.capsules_mri), t.capsules_ct, atol=1e-3)
    pts = t.tumour_mask_mri.voxel_centres_ras(t.tumour_mask_mri.array > 0)[::97]
    shift = np.linalg.norm(t.map_mri_to_ct(pts) - L.apply_transform(t.mri_to_ct, pts), axis=1)
    assert shift.max() > 1.0          # the tumour moved beyond the rigid pose
    assert t.to_dict()["deformation_field"]["file"] == "displacement_ct.nrrd"


def test_demo_truth_check_uses_the_displacement(deformed2):
    from SmartBiopsyLib.workflow import _truth_tre

    # the rigid pose alone is not the truth of a deformed case
    assert _truth_tre(deformed2.truth, deformed2.truth.mri_to_ct) > 0.5


def test_phantom_writes_the_true_displacement_field(deformed2, tmp_path):
    import SimpleITK as sitk

    deformed2.write(tmp_path, dicom=False)
    img = sitk.ReadImage(str(tmp_path / "truth" / "displacement_ct.nrrd"))
    assert img.GetNumberOfComponentsPerPixel() == 3
    arr = sitk.GetArrayFromImage(img)                                 # (k, j, i, 3), R/A/S mm
    k, j, i = (np.array(arr.shape[:3]) // 2)
    p_lps = np.array(img.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
    p_ras = p_lps * [-1, -1, 1]
    assert np.allclose(arr[k, j, i], deformed2.truth.displacement(p_ras)[0], atol=1e-4)


def test_demo_accepts_the_deformation_option():
    from SmartBiopsyLib.cli.main import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(["demo", "--deformation", "--out", "x"])
    assert args.deformation is True
    assert parser.parse_args(["demo", "--out", "x"]).deformation is False


def _habitat_targets(truth):
    from SmartBiopsyLib.characterise.targets import plan_targets

    return plan_targets(truth.mri_habitats, None, predicted_tre_mm=0.0)


def _fuse_and_predict(case, engine="simpleitk"):
    t = case.truth
    fus = fuse_ct_mri(case.ct, case.mri["t2"], do_refine=False)
    lm = fus.landmark
    mri = local_contrast(case.mri["dixon_fat"], case.mri["t2"])[1] if engine == "bspline" else case.mri["t2"]
    loc = refine_local(case.ct, mri, fus.matrix, t.tumour_mask_mri, engine=engine,
                       capsules_mri=lm.moving_points[lm.used], capsules_ct=lm.fixed_points[lm.used],
                       capsule_allowed_mm=capsule_tolerance_mm(lm, factor=2.0, floor_mm=0.5)[lm.used])
    targets = _habitat_targets(t)
    tct = {g.region: L.apply_transform(loc.matrix, np.asarray(g.point_ras)) for g in targets}
    em = predict_target_errors(lm, tct, refined_matrix=loc.candidate_matrix, refined_used=loc.accepted,
                               base_matrix=fus.matrix,
                               measured_deformation_mm=None if loc.deformation_detected is None else
                               loc.deformation_mm(np.array([tct[g.region] for g in targets])))
    true = {g.region: float(np.linalg.norm(tct[g.region] - t.map_mri_to_ct(np.asarray(g.point_ras))[0]))
            for g in targets}
    return fus, loc, em, true


def test_predicted_error_covers_the_true_error_under_deformation(deformed2):
    fus, loc, em, true = _fuse_and_predict(deformed2)
    assert loc.reason and np.isfinite(loc.mi_candidate)
    assert max(true.values()) > 0.8            # the deformation matters at the targets
    for name, e in true.items():
        assert em.p95(name) >= e, (name, e, em.to_dict())
    # and the capsule TRE alone would not have covered it (what the deformation term is for)
    rigid95 = {t.name: 1.614 * t.rigid_tre_rms_mm for t in em.targets}
    assert any(rigid95[n] < e for n, e in true.items())
    # QA never passes a target whose true error exceeds its targetable depth: make each target just too shallow
    from RegistrationFusionLib.registration.qa import build_report, check_targetable_depth

    pts = {t.name: t.point_ct_ras for t in em.targets}
    rep = check_targetable_depth(build_report(fus.landmark, pts), em, {n: e - 0.05 for n, e in true.items()})
    assert not rep.passed and all(any(f"target {n} exceeds" in f for f in rep.failures) for n in true)


def test_rigid_case_keeps_the_capsule_transform_and_a_covering_prediction(phantom0):
    fus, loc, em, true = _fuse_and_predict(phantom0)
    for name, e in true.items():
        assert em.p95(name) >= e
    # the floor of undetectable deformation dominates on a rigid case (measured about 2.5 mm); a much
    # larger prediction would fail reachable targets for nothing
    assert max(em.p95(n) for n in true) <= 4.0
    # the local refinement may not make a rigid case worse than the capsules (measured: it is not adopted)
    pts = phantom0.truth.tumour_mask_mri.voxel_centres_ras(phantom0.truth.tumour_mask_mri.array > 0)[::97]
    truth = L.apply_transform(phantom0.truth.mri_to_ct, pts)
    e_used = np.linalg.norm(L.apply_transform(loc.matrix, pts) - truth, axis=1).mean()
    e_lm = np.linalg.norm(L.apply_transform(fus.matrix, pts) - truth, axis=1).mean()
    assert e_used <= e_lm + 0.1, loc.reason


def test_without_a_local_refinement_the_precision_floor_alone_covers_the_deformation(deformed2):
    # the local refinement's disagreement is noise on this phantom (0.5-1.3 mm even on rigid cases, see
    # bench_fusion_error.py); the error model must not depend on it to cover a deformation it cannot measure
    t = deformed2.truth
    fus = fuse_ct_mri(deformed2.ct, deformed2.mri["t2"], do_refine=False)
    targets = _habitat_targets(t)
    tct = {g.region: L.apply_transform(fus.matrix, np.asarray(g.point_ras)) for g in targets}
    em = predict_target_errors(fus.landmark, tct)
    true = {g.region: float(np.linalg.norm(tct[g.region] - t.map_mri_to_ct(np.asarray(g.point_ras))[0]))
            for g in targets}
    assert max(true.values()) > 0.8
    for name, e in true.items():
        assert em.p95(name) >= e, (name, e, em.to_dict())


@pytest.fixture(scope="module")
def bspline_rigid(phantom0):
    return _fuse_and_predict(phantom0, engine="bspline")


@pytest.fixture(scope="module")
def bspline_deformed(deformed2):
    return _fuse_and_predict(deformed2, engine="bspline")


def test_fat_image_refinement_is_precise_on_a_rigid_case_and_keeps_the_capsule_transform(phantom0, bspline_rigid):
    fus, loc, em, true = bspline_rigid
    # the fat-image rigid candidate lands within 0.3 mm of the landmark result at the targets (measured
    # 0.11-0.14 mm, true landmark error 0.10-0.14 mm; the T2 engine 0.5-1.3 mm): precise, but below the 1 mm
    # needed to adopt it, so the capsule transform stays in use and the case is no worse than the capsules
    assert max(t.local_disagreement_mm for t in em.targets) < 0.3, em.to_dict()
    assert not loc.accepted and "within the refinement's own precision" in loc.reason
    assert np.allclose(loc.matrix, fus.matrix)
    assert loc.deformation_detected is not None, loc.deformation_reason   # a valid measurement
    for name, e in true.items():
        assert em.p95(name) >= e


def test_fat_image_bspline_measures_the_deformation_and_the_prediction_still_covers_it(deformed2, bspline_deformed):
    fus, loc, em, true = bspline_deformed
    # measured: 95th percentile over the tumour 0.70 mm against the capsule transform, 0.32-0.46 mm at the
    # targets (true error 1.7-2.4 mm): it sees part of the deformation, so the floor stays and covers the rest
    assert loc.deformation_detected is True, loc.deformation_reason
    assert all(0.2 < t.measured_deformation_mm < 1.0 for t in em.targets), em.to_dict()
    for name, e in true.items():
        assert em.p95(name) >= e, (name, e, em.to_dict())
    # the measurement maps points through the B-spline (it moves tumour points off the rigid candidate) and
    # brings them closer to the truth than the capsule transform (measured 1.52 vs 1.68 mm mean)
    m = deformed2.truth.tumour_mask_mri
    pts = m.voxel_centres_ras(m.array > 0)[::97]
    moved = loc.map_mri_to_ct_deformable(pts)
    assert np.linalg.norm(moved - L.apply_transform(loc.candidate_matrix, pts), axis=1).max() > 0.2
    truth = deformed2.truth.map_mri_to_ct(pts)
    assert (np.linalg.norm(moved - truth, axis=1).mean()
            < np.linalg.norm(L.apply_transform(fus.matrix, pts) - truth, axis=1).mean())
    assert loc.to_dict()["deformation"]["measured"] is True

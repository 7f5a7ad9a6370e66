"""Predicted registration error (rigid capsule TRE + unmodelled deformation) and the targetable-depth QA rule."""
from __future__ import annotations

import numpy as np
import pytest

from RegistrationFusionLib.registration import landmarks as L
from RegistrationFusionLib.registration.error_model import (CHI3_95, ErrorModelParameters, capsule_excess_mm,
                                                            predict_target_errors)
from RegistrationFusionLib.registration.qa import build_report, check_targetable_depth


def _capsules(rng, jitter_mm=0.0):
    """Eight skin capsules around a 300 x 200 mm body and a rigid-fit PointRegistration of them."""
    ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    ct = np.stack([150 * np.cos(ang), 100 * np.sin(ang), np.tile([-40.0, 40.0], 4)], 1)
    mri = ct + rng.normal(0, 0.2, ct.shape) + rng.normal(0, jitter_mm, ct.shape)
    return L.register_points(ct, mri, fle_ct=0.3, fle_mri=0.5, exclude_outliers=False)


def _shift(matrix, mm):
    m = np.array(matrix, float)
    m[:3, 3] += mm
    return m


def _expected(reg, point, d):
    prm = ErrorModelParameters()
    rigid = reg.predicted_tre(np.asarray(point, float).reshape(1, 3))[0]
    return float(np.sqrt((CHI3_95 * rigid) ** 2 + (prm.deformation_factor * d) ** 2))


def test_without_refinement_the_undetectable_deformation_floor_is_kept():
    reg = _capsules(np.random.default_rng(0))
    prm = ErrorModelParameters()
    res = predict_target_errors(reg, {"A": [0, 0, 0], "B": [20, -10, 5]})
    # no deformation evidence from the capsules (they fit within their localisation error) ...
    assert capsule_excess_mm(reg) < 0.3
    # ... but a deformation below what the images can show is not ruled out: the floor stays
    for t, p in zip(res.targets, ([0, 0, 0], [20, -10, 5])):
        assert t.deformation_mm == pytest.approx(prm.refinement_precision_mm)
        assert t.p95_mm == pytest.approx(_expected(reg, p, prm.refinement_precision_mm))
        assert t.p95_mm > 2 * CHI3_95 * t.rigid_tre_rms_mm
    assert res.transform == "landmark" and res.to_dict()["targets"][0]["name"] == "A"


def test_local_disagreement_raises_the_predicted_error_to_cover_the_deformation():
    reg = _capsules(np.random.default_rng(1))
    # the local refinement moved the target 3 mm away from the capsule transform: the tissue deformed
    cand = _shift(reg.matrix, [3.0, 0.0, 0.0])
    res = predict_target_errors(reg, {"A": [0, 0, 0]}, refined_matrix=cand)
    t = res.targets[0]
    assert t.local_disagreement_mm == pytest.approx(3.0, abs=1e-6)
    assert t.deformation_mm == pytest.approx(3.0, abs=1e-6)
    assert t.p95_mm == pytest.approx(_expected(reg, [0, 0, 0], 3.0))
    assert t.p95_mm >= 2 * 3.0


def test_refinement_noise_alone_does_not_add_to_the_floor():
    reg = _capsules(np.random.default_rng(2))
    prm = ErrorModelParameters()
    cand = _shift(reg.matrix, [0.8 * prm.refinement_precision_mm, 0.0, 0.0])
    res = predict_target_errors(reg, {"A": [0, 0, 0]}, refined_matrix=cand)
    assert res.targets[0].p95_mm == pytest.approx(_expected(reg, [0, 0, 0], prm.refinement_precision_mm))


def test_refined_transform_in_use_measures_disagreement_from_the_transform_in_use():
    reg = _capsules(np.random.default_rng(3))
    cand = _shift(reg.matrix, [0.0, 2.0, 0.0])
    res = predict_target_errors(reg, {"A": [0, 0, 0]}, refined_matrix=cand, refined_used=True)
    t = res.targets[0]
    assert res.transform == "refined"
    assert t.local_disagreement_mm == pytest.approx(2.0, abs=1e-6)
    assert t.p95_mm == pytest.approx(_expected(reg, [0, 0, 0], 2.0))


def test_capsules_that_disagree_with_a_rigid_body_add_deformation():
    rng = np.random.default_rng(4)
    tight, loose = _capsules(rng), _capsules(rng, jitter_mm=2.0)
    assert capsule_excess_mm(loose) > 1.0 > capsule_excess_mm(tight)
    p_t = predict_target_errors(tight, {"A": [0, 0, 0]}).targets[0].p95_mm
    p_l = predict_target_errors(loose, {"A": [0, 0, 0]}).targets[0].p95_mm
    assert p_l > p_t + 1.0


def test_qa_fails_a_target_whose_predicted_error_exceeds_its_targetable_depth():
    reg = _capsules(np.random.default_rng(5))
    pts = {"A": np.zeros(3), "B": np.array([10.0, 0, 0])}
    errs = predict_target_errors(reg, pts, refined_matrix=_shift(reg.matrix, [3.0, 0, 0]))
    pa = errs.p95("A")
    rep = build_report(reg, pts)
    assert rep.passed
    check_targetable_depth(rep, errs, {"A": pa - 0.05, "B": errs.p95("B") + 0.05})
    assert not rep.passed
    assert len(rep.failures) == 1 and "target A exceeds its targetable depth" in rep.failures[0]
    d = rep.to_dict()
    assert d["error_model"]["targets"][0]["p95_mm"] == pytest.approx(pa)
    assert d["targetable_depth_mm"]["B"] == pytest.approx(errs.p95("B") + 0.05)


def test_qa_passes_only_targets_with_room_and_fails_missing_depths():
    reg = _capsules(np.random.default_rng(6))
    pts = {"A": np.zeros(3), "B": np.array([0.0, 10, 0])}
    errs = predict_target_errors(reg, pts)
    rep = check_targetable_depth(build_report(reg, pts), errs, {"A": 10.0, "B": 10.0})
    assert rep.passed
    rep = check_targetable_depth(build_report(reg, pts), errs, {"A": 10.0})
    assert not rep.passed and "target B has no predicted error or no targetable depth" in rep.failures[0]
    rep = check_targetable_depth(build_report(reg, pts), errs, {"A": 10.0, "B": float("nan")})
    assert not rep.passed


# ---------------------------------------------------------------------------------------------- local refinement
def test_local_refinement_is_refused_when_it_breaks_a_capsule_or_moves_too_far():
    from RegistrationFusionLib.registration.local_refine import acceptance_reasons

    ok = acceptance_reasons(0.50, 0.51, [0.4, 1.2], [0.5, 0.9], [2.5, 2.5])
    assert ok == []
    noise = acceptance_reasons(0.50, 0.51, [0.4, 0.9], [0.5, 0.9], [2.5, 2.5])
    assert len(noise) == 1 and "within the refinement's own precision" in noise[0]
    no_gain = acceptance_reasons(0.50, 0.50, [1.4], [0.5], [2.5])
    assert len(no_gain) == 1 and "did not improve" in no_gain[0]
    far = acceptance_reasons(0.50, 0.60, [0.4, 5.5], [0.5], [2.5])
    assert len(far) == 1 and "5.5 mm" in far[0]
    capsule = acceptance_reasons(0.50, 0.60, [1.4], [0.5, 2.6], [2.5, 2.5])
    assert len(capsule) == 1 and "capsule 1 2.6 mm" in capsule[0]
    # NaN never passes
    assert acceptance_reasons(0.50, float("nan"), [1.4], [0.5], [2.5])
    assert acceptance_reasons(0.50, 0.60, [1.4], [float("nan")], [2.5])
    assert acceptance_reasons(0.50, 0.60, [float("nan")], [0.5], [2.5])


def test_elastix_engine_fails_soft_with_one_sentence_when_not_installed(monkeypatch):
    import sys

    from RegistrationFusionLib.registration.local_refine import LocalRefinementUnavailable, _elastix_rigid
    from SmartBiopsyCoreLib.errors import SmartBiopsyError

    monkeypatch.setitem(sys.modules, "itk", None)  # import itk -> ImportError
    with pytest.raises(LocalRefinementUnavailable) as exc:
        _elastix_rigid(None, None, np.eye(4), None, None)
    assert isinstance(exc.value, SmartBiopsyError)
    assert "itk-elastix" in str(exc.value) and str(exc.value).count(". ") == 0


def test_unknown_local_engine_is_refused():
    from RegistrationFusionLib.registration.local_refine import refine_local
    from SmartBiopsyCoreLib.errors import SmartBiopsyError

    with pytest.raises(SmartBiopsyError, match="unknown local refinement engine"):
        refine_local(None, None, np.eye(4), None, engine="ants")


def test_report_shows_the_predicted_error_against_the_targetable_depth():
    from SmartBiopsyLib.report.sections.fusion import _error_model_block

    reg = _capsules(np.random.default_rng(7))
    pts = {"A": np.zeros(3), "B": np.array([10.0, 0, 0])}
    errs = predict_target_errors(reg, pts)
    rep = check_targetable_depth(build_report(reg, pts), errs, {"A": 10.0, "B": 1.0})
    html = "\n".join(_error_model_block(rep.to_dict()))
    assert "predicted 95th pct" in html and "targetable depth" in html
    assert html.count("FAIL") == 1 and html.count(">ok<") == 1
    assert _error_model_block({"passed": True}) == []


# ------------------------------------------------------------------- deformation measured by the local B-spline
def test_a_deformation_measurement_below_the_floor_does_not_lower_it():
    # the fat-image B-spline is quiet on rigid cases (0.2-0.8 mm) but also on some deformed ones (seed 105:
    # 0.12-0.30 mm at targets whose true error is 1.5-2.1 mm), so a quiet measurement cannot rule a deformation out
    reg = _capsules(np.random.default_rng(8))
    prm = ErrorModelParameters()
    res = predict_target_errors(reg, {"A": [0, 0, 0], "B": [20, -10, 5]},
                                refined_matrix=_shift(reg.matrix, [0.2, 0, 0]),
                                measured_deformation_mm=[0.25, 0.3])
    for t, m in zip(res.targets, (0.25, 0.3)):
        assert t.measured_deformation_mm == pytest.approx(m)
        assert t.deformation_mm == pytest.approx(prm.refinement_precision_mm)
        assert t.p95_mm == pytest.approx(_expected(reg, t.point_ct_ras, prm.refinement_precision_mm))


def test_a_measured_deformation_above_the_floor_raises_the_prediction_at_that_target():
    reg = _capsules(np.random.default_rng(9))
    prm = ErrorModelParameters()
    res = predict_target_errors(reg, {"A": [0, 0, 0], "B": [20, -10, 5]},
                                refined_matrix=_shift(reg.matrix, [0.3, 0, 0]),
                                measured_deformation_mm=[1.6, 0.7])
    a, b = res.targets
    assert a.measured_deformation_mm == pytest.approx(1.6) and a.deformation_mm == pytest.approx(1.6)
    assert a.p95_mm == pytest.approx(_expected(reg, [0, 0, 0], 1.6)) and a.p95_mm >= 2 * 1.6
    assert b.deformation_mm == pytest.approx(prm.refinement_precision_mm)
    assert res.to_dict()["targets"][0]["measured_deformation_mm"] == pytest.approx(1.6)


def test_measured_deformation_needs_one_finite_value_per_target():
    reg = _capsules(np.random.default_rng(10))
    for bad in ([0.1, 0.2], [float("nan")], []):
        with pytest.raises(ValueError):
            predict_target_errors(reg, {"A": [0, 0, 0]}, measured_deformation_mm=bad)


def test_local_refinement_registers_the_dixon_fat_image_when_given():
    from RegistrationFusionLib.registration.local_refine import local_contrast
    from SmartBiopsyCoreLib.geometry import RasVolume

    fat = RasVolume(np.ones((4, 4, 4), np.float32), np.eye(4), "fat")
    t2 = RasVolume(np.ones((4, 4, 4), np.float32), np.eye(4), "t2")
    assert local_contrast(fat, t2) == ("dixon_fat", fat)
    assert local_contrast(None, t2) == ("anatomical", t2)
    assert local_contrast(fat.with_array(np.zeros((4, 4, 4), np.float32)), t2)[0] == "anatomical"


def _judge(shift_mm, mi_rigid=0.80, mi_def=0.81, capsule_allowed=1.0):
    """A LocalRefinement whose B-spline moves every point of a 200 mm box by ``shift_mm`` along R, judged."""
    import SimpleITK as sitk

    from RegistrationFusionLib.registration import local_refine as LR

    ref = sitk.Image([50, 50, 50], sitk.sitkFloat32)
    ref.SetSpacing([4.0] * 3)
    ref.SetOrigin([-150.0, -150.0, -100.0])                    # LPS box; RAS R and A from -50 to 150 mm
    bs = sitk.BSplineTransformInitializer(ref, [2, 2, 2], order=3)
    n = len(bs.GetParameters()) // 3
    bs.SetParameters(tuple([-shift_mm] * n + [0.0] * 2 * n))   # LPS x = -R: the CT point moves +R
    out = LR.LocalRefinement("bspline", np.eye(4), np.eye(4), np.eye(4), False, "", [-100] * 3, [100] * 3,
                             0.8, 0.8, 0.0)
    pts = np.random.default_rng(0).uniform(60, 100, (200, 3))  # RAS, inside the box only once flipped to LPS
    caps = np.array([[70.0, 60, 0], [90.0, 80, 10], [60, 90.0, 20]])
    LR._judge_deformation(out, bs, pts, mi_rigid, mi_def, {}, caps, caps, np.full(3, capsule_allowed), 5.0, 0.6)
    return out


def test_deformation_measurement_is_judged_and_refused_when_implausible():
    small, large = _judge(0.3), _judge(0.9, capsule_allowed=2.0)
    assert small.deformation_detected is False and "no deformation seen" in small.deformation_reason
    assert small.deformation_stats_mm["p95"] == pytest.approx(0.3, abs=0.02)
    assert large.deformation_detected is True and "deformed" in large.deformation_reason
    # the measured deformation is where the B-spline puts a point against the transform in use
    assert np.allclose(large.deformation_mm([[70.0, 70, 0], [80.0, 75, 5]]), 0.9, atol=0.02)
    # fail closed: a capsule pushed beyond its tolerance, a lower MI or an implausible shift -> no verdict
    assert _judge(1.5, capsule_allowed=1.0).deformation_detected is None
    assert "capsule" in _judge(1.5, capsule_allowed=1.0).deformation_reason
    assert _judge(0.3, mi_def=0.79).deformation_detected is None
    assert _judge(6.0, capsule_allowed=10.0).deformation_detected is None


def test_workflow_prediction_adds_a_valid_bspline_measurement_and_ignores_a_refused_one():
    from types import SimpleNamespace

    from SmartBiopsyLib.workflow import _predicted_errors

    reg = _capsules(np.random.default_rng(11))
    loc = _judge(1.6, capsule_allowed=5.0)             # a valid measurement moving every tumour point 1.6 mm
    reg.matrix = np.eye(4)                             # the capsule transform in use (identity)
    run = SimpleNamespace(results={"local_refinement": loc, "fusion_base_matrix": np.eye(4)})
    em = _predicted_errors(run, SimpleNamespace(landmark=reg), {"A": np.array([70.0, 70.0, 0.0])})
    assert loc.deformation_detected is True
    assert em.targets[0].measured_deformation_mm == pytest.approx(1.6, abs=0.02)
    assert em.targets[0].deformation_mm == pytest.approx(1.6, abs=0.02)
    loc.deformation_detected = None                     # refused: the measurement must not count
    em = _predicted_errors(run, SimpleNamespace(landmark=reg), {"A": np.array([70.0, 70.0, 0.0])})
    assert em.targets[0].measured_deformation_mm == 0.0
    assert em.targets[0].deformation_mm == pytest.approx(ErrorModelParameters().refinement_precision_mm)

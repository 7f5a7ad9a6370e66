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

"""Registration Fusion panel logic (RegistrationFusionLib.logic, what the widget calls) on a real headless scene."""
from types import SimpleNamespace

import numpy as np
import pytest

from RegistrationFusionLib import scenarios
from RegistrationFusionLib.errors import RegistrationFusionError
from RegistrationFusionLib.logic import FusionLogic, mri_capsule_points, qa_rows
from RegistrationFusionLib.registration.mrml import matrix_from_transform_node

PROBE = np.array([[-20.0, 40.0, 0.0], [60.0, -40.0, 80.0], [-90.0, 120.0, -70.0]])  # CT RAS mm, up to 15 cm away


def _moved(m):
    return PROBE @ np.asarray(m)[:3, :3].T + np.asarray(m)[:3, 3]


def _gap_mm(a, b) -> float:
    return float(np.linalg.norm(_moved(a) - _moved(b), axis=1).max())


def test_registering_twice_equals_registering_once(scene):
    ct, mri, vol, truth = scenarios.reregistration_case(scene)
    logic = FusionLogic(scene)
    t = logic.register(ct, mri, vol)
    first = matrix_from_transform_node(t)
    assert _gap_mm(first, truth) < 2.0
    assert logic.register(ct, mri, vol, t) is t
    assert _gap_mm(matrix_from_transform_node(t), first) < 0.01
    # and the MRI capsules still overlay the CT capsules in world coordinates
    ct_w = np.array([ct.GetNthControlPointPositionWorld(i) for i in range(ct.GetNumberOfControlPoints())])
    mr_w = np.array([mri.GetNthControlPointPositionWorld(i) for i in range(mri.GetNumberOfControlPoints())])
    assert np.min(np.linalg.norm(ct_w[:, None] - mr_w[None], axis=2), axis=1).max() < 1.5


def test_unticking_a_pair_equals_registering_without_it_from_scratch(scene):
    ct, mri, vol, _ = scenarios.reregistration_case(scene)
    logic = FusionLogic(scene)
    t = logic.register(ct, mri, vol)
    logic.set_pair_used(2, False, ct, mri, vol, t)
    unticked = matrix_from_transform_node(t)
    assert logic.state.excluded_pairs == {2}
    ct2, mri2, vol2, _ = scenarios.reregistration_case(scene)
    fresh = matrix_from_transform_node(FusionLogic(scene).register(ct2, mri2, vol2, excluded_pairs={2}))
    assert _gap_mm(unticked, fresh) < 0.01
    rows = qa_rows(logic.qa_report(), logic.state.excluded_pairs)
    assert [r[0] for r in rows].count(False) == 1 and rows[2][0] is False and rows[2][5] == "excluded by you"
    logic.set_pair_used(2, True, ct, mri, vol, t)  # ticked again: back to the first result
    assert _gap_mm(matrix_from_transform_node(t), matrix_from_transform_node(
        FusionLogic(scene).register(*scenarios.reregistration_case(scene)[:3]))) < 0.01


def test_mri_capsules_are_read_in_mri_world_under_the_registration(scene):
    ct, mri, vol, _ = scenarios.reregistration_case(scene)
    before = mri_capsule_points(mri)
    t = FusionLogic(scene).register(ct, mri, vol)
    assert np.allclose(mri_capsule_points(mri, t), before, atol=1e-9)
    # a transform above the registration (e.g. the MRI was moved by hand first) is kept
    above = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "manual")
    import vtk
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 5.0)
    above.SetMatrixTransformToParent(m)
    t.SetAndObserveTransformNodeID(above.GetID())
    assert np.allclose(mri_capsule_points(mri, t), before + [5.0, 0.0, 0.0], atol=1e-9)


def test_too_few_pairs_left_is_refused_with_a_sentence(scene):
    ct, mri, vol, _ = scenarios.reregistration_case(scene)
    logic = FusionLogic(scene)
    t = logic.register(ct, mri, vol)
    with pytest.raises(RegistrationFusionError, match="at least 3"):
        logic.register(ct, mri, vol, t, excluded_pairs=set(range(2, 7)))


def test_approval_needs_a_passed_qa_and_is_withdrawn_by_registering_again(scene):
    ct, mri, vol, _ = scenarios.reregistration_case(scene)
    logic = FusionLogic(scene)
    with pytest.raises(RegistrationFusionError, match="QA"):
        logic.approve(scene.AddNewNodeByClass("vtkMRMLLinearTransformNode"))
    t = logic.register(ct, mri, vol)
    report = logic.qa_report()
    assert report.passed
    logic.approve(t)
    assert t.GetAttribute("SmartBiopsy.RegistrationApproved") == "true"
    logic.register(ct, mri, vol, t)
    assert t.GetAttribute("SmartBiopsy.RegistrationApproved") is None


def test_button_states_follow_the_parameter_node(scene):
    ct, mri, vol, _ = scenarios.reregistration_case(scene)
    ctvol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    pn = SimpleNamespace(ctVolume=ctvol, mriVolume=vol, capsulesCT=None, capsulesMRI=None, transform=None)
    states = FusionLogic.button_states(pn)
    assert states["detect"] and not states["register"] and not states["approve"]
    pn.capsulesCT, pn.capsulesMRI = ct, mri
    assert FusionLogic.button_states(pn)["register"]
    pn.mriVolume = ctvol
    assert not FusionLogic.button_states(pn)["detect"]


def test_logic_scenario_of_the_self_test(scene):
    out = scenarios.scenario_logic_reregistration(scene)
    assert out["twice_mm"] < 0.01 and out["untick_mm"] < 0.01


def _targets_node(scene, points):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Targets")
    for name, p in points.items():
        node.SetNthControlPointLabel(node.AddControlPoint(*map(float, p)), name)
    return node


def test_qa_table_approval_and_stored_qa_give_the_error_models_95th_percentile_not_the_capsule_tre(scene):
    """The capsules sit on the skin: their TRE says nothing of the deformation under it. The panel's target table,
    the approval question and the QA stored at approval carry the error model's 95th percentile, and Smart Biopsy
    evaluates the same model at its own targets from the stored QA, as the command line does."""
    import json

    from RegistrationFusionLib.logic import QA_ATTRIBUTE, target_rows
    from RegistrationFusionLib.registration.error_model import ErrorModelParameters, predict_target_errors
    from SmartBiopsyLib import logic as biopsy_logic

    ct, mri, vol, _ = scenarios.reregistration_case(scene)
    logic = FusionLogic(scene)
    t = logic.register(ct, mri, vol)
    points = {"A": PROBE[0], "B": PROBE[1]}
    report = logic.qa_report(_targets_node(scene, points))
    expected = predict_target_errors(logic.state.registration, points)
    floor = ErrorModelParameters().deformation_factor * ErrorModelParameters().refinement_precision_mm
    rows = target_rows(report)
    for row, e, qt in zip(rows, expected.targets, report.targets):
        name, p95, tre, _shift = row
        assert name == e.name and p95 == pytest.approx(e.p95_mm) and tre == pytest.approx(qt.predicted_tre_mm)
        assert p95 >= floor > tre, (p95, tre)  # the capsules alone would claim a fraction of it
    assert report.error_model["targets"][0]["p95_mm"] == pytest.approx(expected.targets[0].p95_mm)
    largest = max(e.p95_mm for e in expected.targets)
    assert f"largest predicted error {largest:.2f} mm (95th percentile" in logic.approval_question()
    logic.approve(t)
    stored = json.loads(t.GetAttribute(QA_ATTRIBUTE))
    assert [e["predicted_error_p95_mm"] for e in stored["targets"]] == pytest.approx([e.p95_mm for e in expected.targets])
    # Smart Biopsy: the same model at any MRI point (here the QA's targets carried back into the MRI world)
    m = logic.state.registration.matrix
    p95_at = biopsy_logic.registration_error_p95(t)
    for e in expected.targets:
        x_mri = np.linalg.solve(m[:3, :3], np.asarray(e.point_ct_ras) - m[:3, 3])
        assert p95_at(x_mri) == pytest.approx(e.p95_mm, rel=1e-9)
    # approved without targets (the usual order: targets come later, from the habitats): still predicted
    logic.qa_report(None)
    logic.approve(t)
    assert biopsy_logic.registration_error_p95(t)(np.zeros(3)) == pytest.approx(
        predict_target_errors(logic.state.registration, {"o": m[:3, 3]}).targets[0].p95_mm, rel=1e-9)
    # a capsule pair unticked by the user stays out of the stored registration's prediction too
    logic.set_pair_used(2, False, ct, mri, vol, t)
    logic.qa_report(None)
    logic.approve(t)
    m = logic.state.registration.matrix
    far = np.array([[-90.0, 120.0, -70.0]])  # where the capsule geometry matters
    x_mri = np.linalg.solve(m[:3, :3], far[0] - m[:3, 3])
    assert biopsy_logic.registration_error_p95(t)(x_mri) == pytest.approx(
        predict_target_errors(logic.state.registration, {"far": far[0]}).targets[0].p95_mm, rel=1e-9)


def test_smart_biopsy_refuses_a_stored_qa_it_cannot_predict_the_error_from_and_plans_with_the_one_it_can(scene):
    import json

    from SmartBiopsyCoreLib.dataio import volumes_mrml
    from SmartBiopsyCoreLib.errors import InputDataError
    from SmartBiopsyLib import logic as biopsy_logic, scenarios as biopsy_scenarios

    ct, mri, vol, _ = scenarios.reregistration_case(scene)
    logic = FusionLogic(scene)
    t = logic.register(ct, mri, vol)
    logic.qa_report(None)
    logic.approve(t)
    good = json.loads(t.GetAttribute("SmartBiopsy.RegistrationQA"))
    other = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MRI to CT")
    assert biopsy_logic.registration_error_p95(other) is None  # nothing approved

    def stored(qa):
        other.SetAttribute("SmartBiopsy.RegistrationQA", json.dumps(qa))
        return biopsy_logic.registration_error_p95(other)

    older = {k: v for k, v in good.items() if k != "capsule_registration"}  # stored before the error model was
    no_cov = json.loads(json.dumps(good))
    del no_cov["capsule_registration"]["markers"][0]["cov_mri_mm2"]
    bad_ref = dict(good, refinement={"accepted": "yes", "candidate_matrix_mri_to_ct_ras": np.eye(4).tolist()})
    for bad in (older, no_cov, bad_ref, dict(good, matrix_mri_to_ct_ras=None),
                {"method": "intensity-only", "error_estimate_mm": None}, [1, 2]):
        with pytest.raises(InputDataError, match="run its QA again"):
            stored(bad)
    assert stored({"method": "intensity-only", "error_estimate_mm": 4.2})(np.zeros(3)) == 4.2
    # a refinement candidate 3 mm away from the transform in use is a 3 mm deformation term (factor 2.5)
    cand = np.array(good["matrix_mri_to_ct_ras"])
    cand[0, 3] += 3.0
    for accepted in (False, True):
        with_ref = dict(good, refinement={"accepted": accepted, "candidate_matrix_mri_to_ct_ras": cand.tolist()})
        assert 7.5 <= stored(with_ref)(np.zeros(3)) < 7.6

    # the habitat step plans its targets with it: the margin of every target and its hit probability
    case = biopsy_scenarios.synthetic_tumour(spacing_mm=3.0, radius_mm=20.0)
    grid = case["grid"]
    adc = volumes_mrml.add_volume_node(scene, grid.with_array(case["adc"].astype(np.float32)), "ADC")
    ef = volumes_mrml.add_volume_node(scene, grid.with_array(case["ef"].astype(np.float32)), "EF")
    mask = grid.with_array(case["mask"].astype(np.uint8))

    def plan(qa):
        other.SetAttribute("SmartBiopsy.RegistrationQA", json.dumps(qa))
        return {x.region: x for x in biopsy_logic.BiopsyLogic(scene).compute_habitats(
            adc, ef, None, mask, transform_node=other)["targets"]}

    capsules = plan(good)
    p95_at = biopsy_logic.registration_error_p95(other)
    for x in capsules.values():
        assert x.predicted_tre_mm == pytest.approx(p95_at(x.point_ras)) and x.predicted_tre_mm > 2.5
    # depth 7.5-7.9 mm: with 2 mm needle error and half a 10 mm notch, a 2.5 mm error leaves no target safe
    assert not any(x.targetable for x in capsules.values())
    small = plan({"method": "intensity-only", "error_estimate_mm": 0.4})
    large = plan({"method": "intensity-only", "error_estimate_mm": 6.0})
    assert small["A"].targetable and small["C"].targetable
    # the hit probability is computed with that error too: the thin region B is hit less often with a larger one
    assert large["B"].hit_probability < small["B"].hit_probability - 0.03

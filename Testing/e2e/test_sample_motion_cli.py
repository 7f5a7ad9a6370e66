"""``smartbiopsy sample --planning-ct``: patient motion between the CTs is found and corrected, or named."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import smartbiopsy

NEEDLE = "15G/16G-16cm"


@pytest.fixture(scope="module")
def shifted_case(tmp_path_factory, phantom0):
    from SmartBiopsyCoreLib.dataio.imageio import save_image
    from SmartBiopsyCoreLib.dataio.transforms import transform_document
    from SmartBiopsyCoreLib.phantom.confirmation import PatientMotion, confirmation_ct
    from SmartBiopsyLib.sampling.needle import resolve_needle_geometry

    d = tmp_path_factory.mktemp("sample_motion")
    case = phantom0
    target = case.anatomy.tumour_centre + np.array([5.0, 0.0, 0.0])
    entry = target + np.array([60.0, 60.0, 0.0])
    conf = confirmation_ct(case, entry, target, target_name="A", lateral_error_mm=1.0, depth_error_mm=0.5,
                           outer_diameter_mm=resolve_needle_geometry(NEEDLE)["outer_diameter_mm"],
                           motion=PatientMotion(shift_mm=(3.0, -3.0, 2.65), centre_ras=case.anatomy.tumour_centre),
                           seed=1)
    save_image(conf.ct, d / "confirm.nrrd")
    save_image(case.ct, d / "planning.nrrd")
    save_image(case.truth.adc, d / "adc.nrrd")
    save_image(case.truth.ef, d / "ef.nrrd")
    (d / "mri_to_ct.json").write_text(json.dumps(transform_document(np.asarray(case.truth.mri_to_ct), "phantom truth")))
    (d / "plan.json").write_text(json.dumps({"needle": NEEDLE, "targets": [
        {"name": "A", "entry_ras": entry.tolist(), "target_ras": target.tolist()}]}))
    return d, conf


def _sample(d, out, *extra):
    return smartbiopsy("sample", "--confirm-ct", d / "confirm.nrrd", "--plan", d / "plan.json", "--target", "A",
                       "--maps", d / "adc.nrrd", d / "ef.nrrd", "--transform", d / "mri_to_ct.json", "--out", out,
                       *extra, timeout=900)


def test_sample_corrects_patient_motion_with_the_planning_ct(shifted_case, tmp_path):
    d, conf = shifted_case
    res = _sample(d, tmp_path / "out", "--planning-ct", d / "planning.nrrd")
    assert res.returncode == 0, res.stderr[-2000:]
    needle = json.loads((tmp_path / "out" / "needle.json").read_text())
    assert needle["patient_motion"]["corrected"] is True
    assert needle["patient_motion"]["motion_mm"] == pytest.approx(5.0, abs=0.5)
    assert np.linalg.norm(np.asarray(needle["tip_ras"]) - conf.truth.tip_planning_ras) < 1.0
    values = json.loads((tmp_path / "out" / "notch_values.json").read_text())
    assert values["patient_motion"]["corrected"] is True
    assert "warning:" not in res.stderr


def test_sample_names_uncorrected_motion(shifted_case, tmp_path):
    d, conf = shifted_case
    res = _sample(d, tmp_path / "out", "--planning-ct", d / "planning.nrrd", "--no-motion-correction")
    # the uncorrected 5 mm motion puts the measured tip more than 5 mm from the target: a warning that matters
    assert res.returncode == 3, res.stderr[-2000:]
    assert "warning: target A: needle tip" in res.stderr
    assert "warning: the patient moved 5.0 mm" in res.stderr
    needle = json.loads((tmp_path / "out" / "needle.json").read_text())
    assert any("the patient moved 5.0 mm" in w for w in needle["warnings"])
    assert np.linalg.norm(np.asarray(needle["tip_ras"]) - conf.truth.tip_planning_ras) > 3.0


def test_sample_without_planning_ct_says_motion_was_not_checked(shifted_case, tmp_path):
    d, _ = shifted_case
    res = _sample(d, tmp_path / "out", "--accept-warnings")  # the unchecked 5 mm motion leaves the tip > 5 mm off
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning: target A: needle tip" in res.stderr
    assert "patient motion between the planning CT and this confirmation CT was not checked" in res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["patient_motion"] == "not checked"

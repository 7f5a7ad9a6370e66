"""``smartbiopsy calibrate`` as a user runs it: files written, exit codes, refusals in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import smartbiopsy
from SmartBiopsyCoreLib.dataio.imageio import save_image
from SmartBiopsyCoreLib.fiducial_frames.model import load_model
from SmartBiopsyCoreLib.phantom.robot_frame import calibration_ct


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("calibration")
    model = load_model("zframe-7tube")
    ct, truth = calibration_ct(11, model, pixel_mm=1.2, slice_mm=2.0)
    save_image(ct, d / "ct.nrrd")
    save_image(ct.with_array(np.minimum(ct.array, 300).astype(np.int16)), d / "ct_without_frame.nrrd")
    return d, truth, model


def test_calibrate_writes_the_calibration_its_qa_and_a_picture(scans, tmp_path):
    d, truth, model = scans
    res = smartbiopsy("calibrate", "--ct", d / "ct.nrrd", "--target", "0", "0", "0", "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "calibration.json").read_text())
    assert doc["schema"] == "smartbiopsy.robot_calibration/1" and doc["qa"]["passed"] is True
    m = np.asarray(doc["matrix_robot_to_ct_ras"])
    c = model.centre
    assert np.linalg.norm(m[:3, :3] @ c + m[:3, 3] - (truth[:3, :3] @ c + truth[:3, 3])) < 0.2
    from TrajectoryPlannerLib.robot.calibration_io import load_robot_calibration

    assert np.allclose(load_robot_calibration(tmp_path / "calibration.json").matrix_robot_to_ct_ras, m)
    for name in ("robot_to_ct.tfm", "calibration_qa.json", "calibration.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["passed"] is True and "T1" in summary["predicted_error_p95_mm"]


def test_calibrate_exits_3_when_the_frame_fails_its_qa(scans, tmp_path):
    d, _, _ = scans
    res = smartbiopsy("calibrate", "--ct", d / "ct.nrrd", "--target", "0", "0", "0", "--max-residual-mm", "0.001",
                      "--out", tmp_path)
    assert res.returncode == 3 and "failed its QA (residual)" in res.stderr
    # a failed calibration is never written where the robot bridge would take it
    assert not (tmp_path / "calibration.json").exists() and not (tmp_path / "robot_to_ct.tfm").exists()
    assert json.loads((tmp_path / "calibration_qa.json").read_text())["passed"] is False


@pytest.mark.parametrize("args,fragment", [
    (["--frame", "no-such-frame"], "no frame model 'no-such-frame'"),
    (["--ct", "{d}/ct_without_frame.nrrd"], "no zframe-7tube frame found"),
    (["--ct", "{d}/missing.nrrd"], "does not exist"),
])
def test_calibrate_refuses_with_one_line(scans, tmp_path, args, fragment):
    d, _, _ = scans
    args = [a.format(d=d) for a in args]
    if "--ct" not in args:
        args = ["--ct", str(d / "ct.nrrd"), *args]
    res = smartbiopsy("calibrate", *args, "--out", tmp_path / "out")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], res.stderr
    assert "Traceback" not in res.stderr

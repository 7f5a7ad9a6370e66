"""The command line's promises about its output folder and its exit codes, checked as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import smartbiopsy


def _make_read_only(folder):
    """Read-only even for root (immutable attribute), else skip."""
    os.chmod(folder, 0o555)
    try:
        (folder / "probe").write_text("x")
    except OSError:
        return
    (folder / "probe").unlink()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only here (running as root without chattr)")


def _undo_read_only(folder):
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    os.chmod(folder, 0o755)


@pytest.mark.parametrize("command", [
    ["demo"],
    ["run", "--ct", "{missing}"],
    ["register", "--ct", "{missing}", "--mri", "{missing}"],
    ["sample", "--confirm-ct", "{missing}", "--plan", "{missing}", "--target", "A"],
])
def test_read_only_output_folder_is_refused_before_any_work(tmp_path, command):
    ro = tmp_path / "ro"
    ro.mkdir()
    _make_read_only(ro)
    try:
        args = [a.replace("{missing}", str(tmp_path / "missing.nrrd")) for a in command]
        res = smartbiopsy(*args, "--out", ro / "case", timeout=300)
    finally:
        _undo_read_only(ro)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --out") and "not writable" in lines[0], res.stderr
    assert "phantom" not in res.stderr.split("error:")[0] and not res.stdout.strip()  # refused before any work
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("command", [
    ["register", "--ct", "{missing}", "--mri", "{missing}"],
    ["plan", "--ct", "{missing}", "--targets", "{missing}"],
    ["sample", "--confirm-ct", "{missing}", "--plan", "{missing}", "--target", "A"],
])
def test_a_failed_command_leaves_no_empty_output_folder(tmp_path, command):
    args = [a.replace("{missing}", str(tmp_path / "missing.nrrd")) for a in command]
    out = tmp_path / "new" / "case"
    res = smartbiopsy(*args, "--out", out)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if p.name != "missing.nrrd"], \
        list(tmp_path.rglob("*"))


def test_a_failed_run_records_why_and_leaves_no_staging_folder(tmp_path):
    out = tmp_path / "case"
    res = smartbiopsy("run", "--ct", tmp_path / "missing.nrrd", "--out", out)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"][0]["status"] == "failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]


def test_exit_codes_are_documented_in_the_help():
    res = smartbiopsy("--help")
    assert res.returncode == 0
    for code, words in (("0", "acceptance"), ("1", "unexpected"), ("2", "input"), ("3", "warnings that matter"),
                        ("130", "interrupted")):
        assert any(line.strip().startswith(code + " ") and words in line for line in res.stdout.splitlines()), \
            (code, res.stdout)
    for command in ("demo", "run", "sample"):
        res = smartbiopsy(command, "--help")
        assert "--accept-warnings" in res.stdout and "130" in res.stdout, command


# The command line's exit-code handling around a long SimpleITK registration driven by the project's refinement
# step (RegistrationFusionLib.registration.refine._run_stage), on synthetic images: Ctrl-C while ITK iterates.
_ITK_DRIVER = r"""
import sys
import types

import numpy as np
import SimpleITK as sitk

from SmartBiopsyLib.cli.main import run_command
from RegistrationFusionLib.registration.refine import _run_stage


def long_registration(args):
    rng = np.random.default_rng(0)
    img = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(rng.normal(size=(96, 96, 96)).astype(np.float32)), 3.0)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetOptimizerAsGradientDescent(learningRate=1e-6, numberOfIterations=10 ** 7, convergenceMinimumValue=0.0,
                                      convergenceWindowSize=10 ** 6)
    reg.SetInitialTransform(sitk.TranslationTransform(3, [3.0, 2.0, 1.0]))
    reg.SetInterpolator(sitk.sitkLinear)
    sys.stderr.write("ITK-REGISTRATION-RUNNING\n")
    sys.stderr.flush()
    _run_stage(reg, img, img, "rigid", lambda f, m: None, None, 0.0, 1.0)
    return 0


sys.exit(run_command(types.SimpleNamespace(func=long_registration, debug=False, command="register")))
"""


def test_ctrl_c_inside_a_simpleitk_registration_exits_130_with_one_line(tmp_path):
    """SIGINT while the refinement's ImageRegistrationMethod iterates: exit 130 within the 10 s bound with the one
    line "interrupted; outputs written so far are kept"; no traceback, no "check that the CT and MRI overlap"."""
    import signal
    import sys
    import time

    from conftest import cli_env

    proc = subprocess.Popen([sys.executable, "-c", _ITK_DRIVER], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=cli_env())
    try:
        first = proc.stderr.readline()
        assert "ITK-REGISTRATION-RUNNING" in first, first + proc.stderr.read()[-2000:]
        time.sleep(1.0)
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"Ctrl-C inside the SimpleITK registration: exit {proc.returncode} after {elapsed:.2f} s")
    assert proc.returncode == 130, rest[-3000:]
    assert [line for line in rest.splitlines() if line.strip()] == ["interrupted; outputs written so far are kept"], rest
    assert elapsed < 10.0

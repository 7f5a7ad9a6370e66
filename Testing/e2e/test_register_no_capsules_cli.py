"""`smartbiopsy register --no-capsules` as a user runs it: an ambiguous pair is refused with a sentence,
the refusal is recorded in qa.json and no transform is written."""
from __future__ import annotations

import json

import numpy as np

from conftest import smartbiopsy
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid


def _ball(value, background, spacing, seed):
    n = 48
    m = make_grid((-(n - 1) / 2 * spacing,) * 3, (spacing,) * 3, (n, n, n))
    k, j, i = np.mgrid[0:n, 0:n, 0:n]
    r = np.sqrt((i - (n - 1) / 2) ** 2 + (j - (n - 1) / 2) ** 2 + (k - (n - 1) / 2) ** 2) * spacing
    a = np.where(r <= 45.0, value, background) + np.random.default_rng(seed).normal(0, 5.0, r.shape)
    return RasVolume(a.astype(np.float32), m, "ball")


def test_register_no_capsules_refuses_ambiguous_pair_and_writes_no_transform(tmp_path):
    from SmartBiopsyCoreLib.dataio.imageio import save_image

    save_image(_ball(0.0, -1000.0, 3.0, 1), tmp_path / "ct.nrrd")
    save_image(_ball(400.0, 10.0, 2.5, 2), tmp_path / "mr.nrrd")
    out = tmp_path / "out"
    proc = smartbiopsy("register", "--ct", tmp_path / "ct.nrrd", "--mri", tmp_path / "mr.nrrd", "--out", out,
                       "--no-capsules")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "transform.json").exists() and not (out / "mri_to_ct.tfm").exists()
    q = json.loads((out / "qa.json").read_text())
    assert q["passed"] is False and q["method"] == "intensity-only" and q["fre_mm"] is None


def test_run_fuses_capsule_free_real_pair_in_the_fuse_stage(shared_data, tmp_path):
    """RIRE head CT/T2 (no capsules): `run` falls back to the capsule-free fusion in its fuse stage and
    records an intensity-only QA; it then stops at the missing DWI, with its summary written."""
    out = tmp_path / "run"
    proc = smartbiopsy("run", "--ct", shared_data / "rire-pat002/pat002_ct.nrrd", "--t2",
                       shared_data / "rire-pat002/pat002_mr_T2.nrrd", "--robot", "none", "--out", out)
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert stages["fuse"]["status"] == "done", (stages["fuse"], proc.stderr[-500:])
    assert "capsule-free intensity-only fusion" in stages["fuse"]["message"]
    q = json.loads((out / "registration" / "qa.json").read_text())
    assert q["method"] == "intensity-only" and q["passed"] and q["fre_mm"] is None
    assert (out / "registration" / "mri_to_ct.json").exists()


def test_capsule_free_register_with_failed_qa_exits_3_unless_the_warning_is_accepted(monkeypatch, tmp_path, capsys):
    """An accepted capsule-free fusion whose intensity-only QA failed is a warning that matters, as on the capsule
    path: exit 3, and 0 only with --accept-warnings."""
    from types import SimpleNamespace

    from SmartBiopsyLib.cli import cmd_register

    monkeypatch.setattr(cmd_register, "_write_outputs", lambda *a, **k: None)
    intensity = SimpleNamespace(error_estimate_mm=6.0, n_agreeing=2, prior="HFS", seconds=1.0)
    failed = SimpleNamespace(report=SimpleNamespace(passed=False, failures=["estimated error 6.0 mm > 5.0 mm"],
                                                    notes=[]), intensity=intensity, fallback_reason="no capsules",
                             matrix=None)
    args = (None, None, {}, tmp_path, lambda f, m: None)
    assert cmd_register._write_intensity(failed, *args) == 3
    assert "registration QA failed (estimated error 6.0 mm" in capsys.readouterr().err
    assert cmd_register._write_intensity(failed, *args, accept_warnings=True) == 0
    passed = SimpleNamespace(report=SimpleNamespace(passed=True, failures=[], notes=[]), intensity=intensity,
                             fallback_reason="no capsules", matrix=None)
    assert cmd_register._write_intensity(passed, *args) == 0

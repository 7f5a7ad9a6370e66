"""Command line: ``smartbiopsy sample`` as a user runs it (synthetic confirmation CT, MRI-grid maps, plan)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyCoreLib.dataio.imageio import save_image
from SmartBiopsyLib.sampling.needle_sim import simulate_confirmation_ct

from conftest import smartbiopsy
from SmartBiopsyCoreLib.dataio.transforms import transform_document

ROOT = Path(__file__).resolve().parents[2]



def assert_user_error(res, fragment):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert fragment.lower() in lines[-1].lower(), lines[-1]


def _rot(axis, deg):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    rng = np.random.default_rng(4)
    shape = (60, 120, 120)
    hu = np.rint(20 + rng.normal(0, 10, shape)).astype(np.int16)
    hu[:, :, :6] = hu[:, :, -6:] = -1000  # air beside the patient (R/L edges, far from the path): a CT in HU
    ct0 = RasVolume(hu, make_grid([-60.0, -60.0, -60.0], [1.0, 1.0, 2.0], shape), "ct")
    direction = np.array([0.3, 1.0, 0.4]) / np.linalg.norm([0.3, 1.0, 0.4])
    target = np.array([2.0, 3.0, -1.0])
    entry = target - 55.0 * direction
    sim = simulate_confirmation_ct(ct0, entry, target, "17G/18G-10mm", lateral_error_mm=1.0, depth_error_mm=1.5, seed=2)
    save_image(sim.ct, d / "confirm_ct.nrrd")
    save_image(ct0, d / "ct_without_needle.nrrd")
    # MRI world in another pose; maps constant around the target so the expected values are exact
    m2c = np.eye(4)
    m2c[:3, :3] = _rot([0.2, 0.3, 1.0], 12.0)
    m2c[:3, 3] = [30.0, -80.0, 60.0]
    target_mri = np.linalg.inv(m2c) @ np.append(target, 1.0)
    grid = make_grid(target_mri[:3] - 60.0, [1.5, 1.5, 5.0], (24, 80, 80))
    const = {"adc": 1234.0, "ff": 7.5, "ef": 42.0}
    for name, value in const.items():
        save_image(RasVolume(np.full((24, 80, 80), value, np.float32), grid, name), d / f"{name}.nrrd")
    (d / "mri_to_ct.json").write_text(json.dumps(transform_document(m2c, "test")))
    (d / "ct_to_mri.json").write_text(json.dumps(transform_document(np.linalg.inv(m2c), "test")))
    (d / "bare_matrix.json").write_text(json.dumps(m2c.tolist()))
    (d / "old_keys.json").write_text(json.dumps({"matrix": m2c.tolist()}))
    doc = transform_document(m2c, "test")
    (d / "ct_frame.json").write_text(json.dumps({**doc, "from_frame": "CT", "to_frame": "MRI"}))
    (d / "lps.json").write_text(json.dumps({**doc, "space": "LPS"}))
    (d / "extra_key.json").write_text(json.dumps({**doc, "inverse": True}))
    far = np.eye(4)
    far[:3, 3] = [0.0, 0.0, 400.0]
    (d / "wrong.json").write_text(json.dumps(transform_document(far, "test")))
    plan = {"needle": {"name": "17G/18G-10mm"},
            "trajectories": [
                {"name": "A-2", "target": "A", "region": "A", "entry_ras": (entry + [5, 0, 0]).tolist(),
                 "target_ras": target.tolist(), "rank": 2},
                {"name": "A-1", "target": "A", "region": "A", "entry_ras": entry.tolist(),
                 "target_ras": target.tolist(), "rank": 1}]}
    (d / "plan.json").write_text(json.dumps(plan))
    (d / "broken.json").write_text("{not json")
    return d, sim, const


def test_sample_writes_needle_and_notch_values(case, tmp_path):
    d, sim, const = case
    out = tmp_path / "out"
    res = smartbiopsy("sample", "--confirm-ct", d / "confirm_ct.nrrd", "--plan", d / "plan.json", "--target", "A",
                      "--maps", d / "adc.nrrd", d / "ff.nrrd", d / "ef.nrrd", "--transform", d / "mri_to_ct.json",
                      "--mode", "side-notch", "--out", out)
    assert res.returncode == 0, res.stderr
    needle = json.loads((out / "needle.json").read_text())
    assert np.linalg.norm(np.array(needle["tip_ras"]) - sim.truth.tip_ras) <= 1.0
    assert needle["depth_error_mm"] == pytest.approx(1.5, abs=1.0)
    assert needle["lateral_error_mm"] == pytest.approx(1.0, abs=1.0)
    values = json.loads((out / "notch_values.json").read_text())
    assert values["roi"]["mode"] == "side-notch" and values["roi"]["length_mm"] == pytest.approx(10.0)
    for name, value in const.items():
        assert values["maps"][name]["mean"] == pytest.approx(value, rel=1e-4)
        assert values["maps"][name]["volume_mm3"] == pytest.approx(values["roi"]["volume_mm3"], rel=0.03)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["means"]["adc"] == pytest.approx(const["adc"], rel=1e-4)


def test_tip_distal_mode_without_maps_writes_the_region(case, tmp_path):
    d, sim, _ = case
    res = smartbiopsy("sample", "--confirm-ct", d / "confirm_ct.nrrd", "--plan", d / "plan.json", "--target", "a",
                      "--mode", "tip-distal", "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    values = json.loads((tmp_path / "notch_values.json").read_text())
    assert values["roi"]["shape"] == "cylinder" and values["roi"]["radius_mm"] == 1.0
    np.testing.assert_allclose(values["roi"]["start_ras"], sim.truth.tip_ras, atol=1.0)


def test_refuses_ct_without_needle(case, tmp_path):
    d, _, _ = case
    res = smartbiopsy("sample", "--confirm-ct", d / "ct_without_needle.nrrd", "--plan", d / "plan.json",
                      "--target", "A", "--out", tmp_path)
    assert_user_error(res, "no metal needle")


@pytest.mark.parametrize("transform,fragment", [("ct_to_mri.json", "outside map"), ("wrong.json", "outside map"),
                                                ("missing.json", "does not exist"), ("broken.json", "not valid JSON"),
                                                ("bare_matrix.json", "bare matrix does not say its frames"),
                                                ("old_keys.json", "schema None"),
                                                ("ct_frame.json", "maps CT to MRI"),
                                                ("lps.json", "in LPS mm"),
                                                ("extra_key.json", "unknown keys inverse")])
def test_refuses_mismatched_or_invalid_transform(case, tmp_path, transform, fragment):
    d, _, _ = case
    res = smartbiopsy("sample", "--confirm-ct", d / "confirm_ct.nrrd", "--plan", d / "plan.json", "--target", "A",
                      "--maps", d / "adc.nrrd", "--transform", d / transform, "--out", tmp_path)
    assert_user_error(res, fragment)


def test_refuses_unknown_target_and_broken_plan(case, tmp_path):
    d, _, _ = case
    res = smartbiopsy("sample", "--confirm-ct", d / "confirm_ct.nrrd", "--plan", d / "plan.json", "--target", "Z",
                      "--out", tmp_path)
    assert_user_error(res, "target 'Z' is not in the plan")
    res = smartbiopsy("sample", "--confirm-ct", d / "confirm_ct.nrrd", "--plan", d / "broken.json", "--target", "A",
                      "--out", tmp_path)
    assert_user_error(res, "not valid JSON")


def test_sample_with_the_tip_far_from_the_target_exits_3_unless_the_warning_is_accepted(case, tmp_path):
    """A needle tip 8-9 mm short of the planned target is a warning that matters: printed, recorded in needle.json
    (strict JSON), exit 3; with --accept-warnings the same run exits 0."""
    from SmartBiopsyCoreLib.dataio.jsonio import loads_strict

    d, sim, _ = case
    plan = json.loads((d / "plan.json").read_text())
    best = next(t for t in plan["trajectories"] if t["rank"] == 1)
    entry, target = np.asarray(best["entry_ras"]), np.asarray(best["target_ras"])
    deeper = target + 10.0 * (target - entry) / np.linalg.norm(target - entry)
    best["target_ras"] = deeper.tolist()
    plan["trajectories"] = [best]
    (tmp_path / "plan_deep.json").write_text(json.dumps(plan))
    args = ("sample", "--confirm-ct", d / "confirm_ct.nrrd", "--plan", tmp_path / "plan_deep.json", "--target", "A",
            "--mode", "tip-distal")
    res = smartbiopsy(*args, "--out", tmp_path / "out")
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning: target A: needle tip")]
    assert warned and "tolerance 5 mm" in warned[0], res.stderr
    needle = loads_strict((tmp_path / "out" / "needle.json").read_text())
    assert needle["tip_error_mm"] > 5.0 and needle["acceptance"]["met"] is False
    loads_strict((tmp_path / "out" / "notch_values.json").read_text())
    ok = smartbiopsy(*args, "--accept-warnings", "--out", tmp_path / "out2")
    assert ok.returncode == 0, ok.stderr
    assert any(line.startswith("warning: target A: needle tip") for line in ok.stderr.splitlines())

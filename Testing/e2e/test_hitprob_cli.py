"""Hit probability in ``characterise`` and ``plan`` outputs, as a user runs them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import smartbiopsy
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid

RISK = "bone=3,aorta=4,ivc=5,kidney=6,bowel=7,bowel_gas=8"


def _write(tmp_path, name, arr, grid):
    p = tmp_path / f"{name}.nrrd"
    sitk.WriteImage(RasVolume(arr, grid, name).to_sitk(), str(p))
    return str(p)


def test_characterise_reports_hit_probability_per_target(tmp_path):
    grid = make_grid((0, 0, 0), (1.5, 1.5, 3.0), (16, 50, 50))
    shape = (16, 50, 50)
    tum = np.zeros(shape, np.uint8)
    tum[2:14, 8:42, 8:42] = 1
    left = np.arange(50)[None, None, :] < 25
    adc = np.where(tum & left, 900.0, np.where(tum, 1900.0, 1400.0)).astype(np.float32)
    ef = np.where(tum & left, 130.0, np.where(tum, 20.0, 40.0)).astype(np.float32)
    out = tmp_path / "out"
    p = smartbiopsy("characterise", "--adc", _write(tmp_path, "adc", adc, grid), "--ef", _write(tmp_path, "ef", ef, grid),
                    "--tumour", _write(tmp_path, "tumour", tum, grid), "--no-radiomics", "--predicted-tre", "1.5",
                    "--out", out)
    assert p.returncode == 0, p.stderr
    assert "hit probability" in p.stdout and "at least 50% of the notch volume" in p.stdout
    for doc in (json.loads((out / "targets.json").read_text()),
                json.loads((out / "characterisation.json").read_text())):
        for t in doc["targets"]:
            assert 0.0 <= t["hit_probability"] <= 1.0 and t["hit_probability_se"] >= 0.0
            assert "at least 50% of the notch volume" in t["hit_definition"]
            assert t["hit_model"]["registration_error"]["rms_mm"] == pytest.approx(1.5)
            assert t["hit_model"]["needle_lateral_rms_mm"] == 2.0
            assert t["hit_model"]["direction_source"].startswith("no plan yet")
            assert len(t["candidates"]) >= 2


@pytest.fixture(scope="module")
def plan_files(phantom0, tmp_path_factory):
    from SmartBiopsyCoreLib.dataio.imageio import save_image

    d = tmp_path_factory.mktemp("hit_plan")
    case = phantom0
    ct = save_image(case.ct, d / "ct.nrrd")
    risk_labels = np.where(np.isin(case.ct_labels.array, [3, 4, 5, 6, 7, 8]), case.ct_labels.array, 0)
    risk = save_image(case.ct_labels.with_array(risk_labels.astype(np.uint8)), d / "risk.nrrd")
    hab = save_image(case.ct_habitats, d / "habitats_ct.nrrd")
    targets = []
    for value, name in ((1, "A"), (2, "B"), (3, "C")):
        m = case.ct_habitats.array == value
        dist = ndimage.distance_transform_edt(m, sampling=case.ct.spacing[::-1])
        k = np.unravel_index(int(np.argmax(dist)), dist.shape)
        targets.append({"name": name, "region": name, "predicted_tre_mm": 1.5,
                        "point_ras": case.ct.kji_to_ras_points(np.array([k]))[0].tolist()})
    tfile = d / "targets.json"
    tfile.write_text(json.dumps({"frame": "RAS", "units": "mm", "targets": targets}))
    return {"ct": ct, "risk": risk, "habitats": hab, "targets": str(tfile), "dir": d}


def test_plan_adds_hit_probability_along_each_planned_path(plan_files):
    out = plan_files["dir"] / "out"
    p = smartbiopsy("plan", "--ct", plan_files["ct"], "--targets", plan_files["targets"], "--risk", plan_files["risk"],
                    "--risk-labels", RISK, "--top-n", "2", "--habitats", plan_files["habitats"], "--out", out)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    plan = json.loads((out / "plan.json").read_text())
    assert set(summary["hit_probability"]) == set(summary["best"].values())
    for t in plan["trajectories"]:
        hp = t["hit_probability"]
        assert hp["direction_source"] == "planned trajectory" and hp["region"] == t["region"]
        d = np.subtract(t["target_ras"], t["entry_ras"])
        assert np.allclose(hp["direction_ras"], d / np.linalg.norm(d), atol=1e-4)
        assert np.allclose(hp["point_ras"], t["target_ras"], atol=1e-3)  # habitat map already in CT space
        assert hp["registration_error"]["rms_mm"] == pytest.approx(1.5)
        assert hp["probability"] >= 0.9  # deepest points of large phantom habitats


def test_plan_refuses_transform_without_habitats(plan_files, tmp_path):
    p = smartbiopsy("plan", "--ct", plan_files["ct"], "--targets", plan_files["targets"], "--registration-error",
                    "2", "--out", tmp_path / "o")
    assert p.returncode == 2 and "--habitats" in p.stderr and "Traceback" not in p.stderr

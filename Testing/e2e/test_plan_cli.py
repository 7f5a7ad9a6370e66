"""``smartbiopsy plan`` as a user runs it: phantom CT + label map + targets.json -> plan.json + skin model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from conftest import smartbiopsy

ROOT = Path(__file__).resolve().parents[2]
RISK = "bone=3,aorta=4,ivc=5,kidney=6,bowel=7,bowel_gas=8"



def assert_clean_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, proc.stderr
    for w in words:
        assert w.lower() in err[0].lower(), err[0]
    return err[0]


def phantom_targets(case) -> list[dict]:
    """Deepest point of habitats A, B, C (1, 2, 3) on the CT grid, RAS mm."""
    out = []
    for value, name in ((1, "A"), (2, "B"), (3, "C")):
        m = case.ct_habitats.array == value
        d = ndimage.distance_transform_edt(m, sampling=case.ct.spacing[::-1])
        k = np.unravel_index(int(np.argmax(d)), d.shape)
        out.append({"name": name, "region": name, "point_ras": case.ct.kji_to_ras_points(np.array([k]))[0].tolist()})
    return out


@pytest.fixture(scope="module")
def case_files(phantom0, tmp_path_factory):
    from SmartBiopsyCoreLib.dataio.imageio import save_image

    d = tmp_path_factory.mktemp("plan_case")
    ct = save_image(phantom0.ct, d / "ct.nrrd")
    risk_labels = np.where(np.isin(phantom0.ct_labels.array, [3, 4, 5, 6, 7, 8]), phantom0.ct_labels.array, 0)
    risk = save_image(phantom0.ct_labels.with_array(risk_labels.astype(np.uint8)), d / "risk.nrrd")
    targets = d / "targets.json"
    targets.write_text(json.dumps({"frame": "RAS", "units": "mm", "targets": phantom_targets(phantom0)}))
    return {"ct": ct, "risk": risk, "targets": str(targets), "dir": d}


def test_plan_writes_plan_json_and_skin_model(case_files, phantom0):
    out = case_files["dir"] / "out"
    p = smartbiopsy("plan", "--ct", case_files["ct"], "--targets", case_files["targets"], "--risk", case_files["risk"],
                    "--risk-labels", RISK, "--needle", "15G/16G-16cm", "--out", out)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    plan = json.loads((out / "plan.json").read_text())
    assert [t["name"] for t in plan["targets"]] == ["A", "B", "C"]
    assert {t["region"] for t in plan["trajectories"]} == {"A", "B", "C"}
    for t in plan["trajectories"]:
        assert set(t) >= {"name", "region", "entry_ras", "target_ras", "needle", "length_mm", "clearance_mm",
                          "angle_to_axial_deg", "score", "rank"}
        assert t["length_mm"] <= plan["needle"]["max_reach_mm"] + 1e-6
        for name, c in t["clearance_mm"].items():
            assert c >= t["margin_mm"][name] - 1e-6
        # independent check against the label map: nearest structure voxel centre along the needle axis
        e, tip = np.array(t["entry_ras"]), np.array(t["tip_ras"])
        pts = e + np.linspace(0, 1, int(np.linalg.norm(tip - e) / 0.2) + 2)[:, None] * (tip - e)
        kji = np.rint(phantom0.ct.ras_to_ijk_points(pts)[:, ::-1]).astype(int)
        labels_on_path = phantom0.ct_labels.array[kji[:, 0], kji[:, 1], kji[:, 2]]
        assert not np.isin(labels_on_path, [3, 4, 5, 6, 7, 8]).any(), t["name"]
    assert set(plan["rejections"]) == {"A", "B", "C"}
    assert plan["shared_entry"] is None or len(plan["shared_entry"]["trajectories"]) == 3
    assert Path(summary["skin_model"]).stat().st_size > 10_000


def test_bad_targets_and_unknown_needle_are_one_line_errors(case_files, tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    assert_clean_error(smartbiopsy("plan", "--ct", case_files["ct"], "--targets", bad, "--out", tmp_path / "o"),
                       "not valid JSON")
    assert_clean_error(smartbiopsy("plan", "--ct", case_files["ct"], "--targets", case_files["targets"],
                                   "--needle", "9G-foo", "--out", tmp_path / "o"), "unknown needle", "17G/18G-20mm")
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"targets": [{"name": "X", "point_ras": [0.0, 0.0, 5000.0]}]}))
    assert_clean_error(smartbiopsy("plan", "--ct", case_files["ct"], "--targets", outside, "--out", tmp_path / "o"),
                       "outside the CT")
    assert_clean_error(smartbiopsy("plan", "--ct", case_files["ct"], "--targets", case_files["targets"],
                                   "--risk-labels", "aorta", "--out", tmp_path / "o"), "NAME=VALUE")


def test_no_safe_path_names_the_constraints_and_counts(case_files, tmp_path):
    p = smartbiopsy("plan", "--ct", case_files["ct"], "--targets", case_files["targets"], "--margin", "bone=80",
                    "--out", tmp_path / "o")
    line = assert_clean_error(p, "no safe path", "too close to bone", "in the excluded entry region")
    assert any(ch.isdigit() for ch in line)


def test_segment_names_come_from_a_seg_nrrd_header(tmp_path):
    import SimpleITK as sitk

    from SmartBiopsyLib.cli import cmd_plan
    from SmartBiopsyCoreLib.errors import InputDataError

    img = sitk.Image([8, 8, 4], sitk.sitkUInt8)
    for i, (name, value) in enumerate((("Aorta", 1), ("Bowel", 2))):
        img.SetMetaData(f"Segment{i}_Name", name)
        img.SetMetaData(f"Segment{i}_LabelValue", str(value))
        img.SetMetaData(f"Segment{i}_Layer", "0")
    path = tmp_path / "risk.seg.nrrd"
    sitk.WriteImage(img, str(path))
    assert cmd_plan._segment_names(path) == {1: "Aorta", 2: "Bowel"}
    img.SetMetaData("Segment1_Layer", "1")
    sitk.WriteImage(img, str(path))
    with pytest.raises(InputDataError, match="layers"):
        cmd_plan._segment_names(path)

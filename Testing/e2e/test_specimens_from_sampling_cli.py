"""``smartbiopsy specimens add --from-sampling``: the operator records a pot pre-filled from measured values."""
from __future__ import annotations

import json

from conftest import smartbiopsy

STATS = {"mean": 1210.0, "median": 1200.0, "min": 950.0, "max": 1500.0, "sd": 80.0, "voxels_touched": 12,
         "volume_mm3": 40.5, "units": "1e-6 mm^2/s"}


def _folder(tmp_path, **extra):
    d = tmp_path / "sampling" / "A"
    d.mkdir(parents=True)
    det = {"target_name": "A", "tip_ras": [1.0, 2.0, 3.0], "axis": [0.0, 0.6, 0.8]}
    (d / "needle.json").write_text(json.dumps({"detection": det, **extra}))
    (d / "notch.json").write_text(json.dumps({"roi": {"mode": "side-notch", "length_mm": 19.0},
                                              "values": {"target_name": "A", "maps": {"adc": STATS}}}))
    return d


def test_operator_records_a_pot_prefilled_from_a_measured_folder(tmp_path):
    d = _folder(tmp_path)
    journal = tmp_path / "journal.jsonl"
    res = smartbiopsy("specimens", "add", "--journal", journal, "--from-sampling", d, "--pot-id", "P7-A",
                      "--operator", "Dr Who")
    assert res.returncode == 0, res.stderr
    rec = json.loads(smartbiopsy("specimens", "show", "--journal", journal).stdout)["specimens"]["P7-A"]
    assert rec["values"]["adc"]["mean"] == 1210.0 and rec["values"]["adc"]["n_voxels"] == 12
    assert rec["needle_tip_ras"] == [1.0, 2.0, 3.0] and rec["region"] == "A" and rec["operator"] == "Dr Who"
    assert "pre-filled from the measured sampling folder" in rec["notes"]


def test_refuses_the_demo_simulated_needle(tmp_path):
    d = _folder(tmp_path, simulated=True)
    res = smartbiopsy("specimens", "add", "--journal", tmp_path / "j.jsonl", "--from-sampling", d, "--pot-id", "P",
                      "--operator", "X")
    assert res.returncode == 2 and "simulated needle" in res.stderr
    assert not (tmp_path / "j.jsonl").exists() or not (tmp_path / "j.jsonl").read_text().strip()


def test_needs_the_operator_and_the_pot(tmp_path):
    d = _folder(tmp_path)
    res = smartbiopsy("specimens", "add", "--journal", tmp_path / "j.jsonl", "--from-sampling", d, "--pot-id", "P")
    assert res.returncode == 2 and "--operator" in res.stderr

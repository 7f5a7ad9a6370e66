"""Command line: ``smartbiopsy cohort`` and ``smartbiopsy specimens`` as a user runs them."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

from conftest import smartbiopsy

ROOT = Path(__file__).resolve().parents[2]



def assert_user_error(res, fragment):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert fragment.lower() in lines[-1].lower(), lines[-1]


@pytest.fixture()
def cohort_csv(tmp_path):
    """12 synthetic participants x 3 regions; values are made up for the test, not study data."""
    rng = np.random.default_rng(21)
    rows = []
    for i in range(12):
        spread = rng.uniform(0.1, 1.0)
        for j, region in enumerate("ABC"):
            adc = 1000 + 800 * spread * (j - 1) + rng.normal(0, 30)
            ki = 30 + 25 * spread * (1 - j) + rng.normal(0, 2)
            grade = 3 if adc < 900 else (2 if adc < 1300 else 1)
            rows.append([f"P{i:02d}", region, f"{adc:.1f}", f"{rng.uniform(0, 20):.2f}", f"{ki:.1f}", grade])
    rows[4][4] = ""  # one missing Ki-67
    path = tmp_path / "cohort.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["participant", "region", "adc", "ff", "ki67_percent", "fnclcc_grade"])
        w.writerows(rows)
    return path


def _load_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cohort_writes_summary_and_stats_matching_independent_computation(cohort_csv, tmp_path):
    out = tmp_path / "out"
    res = smartbiopsy("cohort", "--csv", cohort_csv, "--out", out)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["participants"] == 12 and info["sites"] == 36
    assert info["maps"] == ["adc", "ff"] and info["pathology"] == ["ki67_percent", "fnclcc_grade"]

    sites = _load_rows(cohort_csv)
    by_p: dict = {}
    for r in sites:
        by_p.setdefault(r["participant"], []).append(r)
    summary = {r["participant"]: r for r in _load_rows(out / "participant_summary.csv")}
    assert sorted(summary) == sorted(by_p)
    adc_range, ki_range = [], []
    for p in sorted(by_p):
        adc = [float(r["adc"]) for r in by_p[p]]
        ki = [float(r["ki67_percent"]) for r in by_p[p] if r["ki67_percent"]]
        assert float(summary[p]["adc_mean"]) == pytest.approx(np.mean(adc))
        assert float(summary[p]["adc_range"]) == pytest.approx(max(adc) - min(adc))
        assert int(summary[p]["ki67_percent_n_sites"]) == len(ki)
        adc_range.append(max(adc) - min(adc))
        ki_range.append(max(ki) - min(ki))

    stats_json = json.loads((out / "cohort_stats.json").read_text())
    corr = next(c for c in stats_json["correlations"] if c["map"] == "adc" and c["pathology"] == "ki67_percent")
    ref = st.spearmanr(adc_range, ki_range)
    assert corr["participant_ranges"]["rho"] == pytest.approx(ref.statistic, abs=1e-12)
    assert corr["participant_ranges"]["n"] == 12
    assert "Fisher z" in corr["participant_ranges"]["method"]
    assert corr["site_values"]["n"] == 35  # one missing Ki-67 omitted
    d = stats_json["descriptive"]["adc"]["site_values"]
    assert d["median"] == pytest.approx(np.median([float(r["adc"]) for r in sites]))
    assert "type 7" in d["method"]
    roc = next(r for r in stats_json["roc_high_grade"] if r["map"] == "adc")
    assert roc["youden_index"] == pytest.approx(roc["sensitivity"] + roc["specificity"] - 1)
    assert roc["auc"] < 0.5  # grade 3 was given to low ADC; the rule "higher" is stated, so AUC < 0.5


def test_cohort_reports_uncomputable_statistics_instead_of_failing(tmp_path):
    path = tmp_path / "small.csv"
    path.write_text("participant,site,adc,ki67_percent\nP1,A,1000,10\nP1,B,1200,20\nP2,A,900,\n")
    res = smartbiopsy("cohort", "--csv", path, "--out", tmp_path / "o")
    assert res.returncode == 0, res.stderr
    s = json.loads((tmp_path / "o" / "cohort_stats.json").read_text())
    assert "not_computed" in s["correlations"][0]["participant_ranges"]


@pytest.mark.parametrize("content, extra, fragment", [
    (None, [], "does not exist"),
    ("", [], "empty"),
    ("participant,site,adc\n", [], "no site rows"),
    ("patient,site,adc\nP1,A,1\n", [], "no 'participant' column"),
    ("participant,position,adc\nP1,A,1\n", [], "no 'site' column"),
    ("participant,site\nP1,A\n", [], "no value columns"),
    ("participant,site,adc\nP1,A,1200 um2/s\n", [], "not a number"),
    ("participant,site,adc\nP1,A,inf\n", [], "finite"),
    ("participant,site,adc\nP1,A,1\nP1,A,2\n", [], "repeats participant P1 site A"),
    ("participant,site,adc\n,A,1\n", [], "lacks the participant"),
    ("participant,site,adc\nP1,A,1,5\n", [], "cells"),
    ("participant,site,adc,adc\nP1,A,1,2\n", [], "duplicate column"),
    ("participant,site,adc\nP1,A,1\n", ["--maps", "ef"], "not in the cohort file"),
    ("participant,site,adc,ki67\nP1,A,1,2\n", ["--maps", "adc,ki67", "--pathology", "ki67"], "both as map"),
    ("participant,site,adc\nP1,A,1\n", ["--quantile-method", "excel"], "unknown quantile"),
])
def test_cohort_rejects_bad_input_with_one_line(tmp_path, content, extra, fragment):
    path = tmp_path / "c.csv"
    if content is not None:
        path.write_text(content)
    res = smartbiopsy("cohort", "--csv", path, "--out", tmp_path / "o", *extra)
    assert_user_error(res, fragment)


def test_cohort_rejects_out_path_that_is_a_file(cohort_csv, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_user_error(smartbiopsy("cohort", "--csv", cohort_csv, "--out", tmp_path / "file"), "not a folder")


# ----------------------------------------------------------------------------------------------- specimens

def _record(pot, region):
    return {"pot_id": pot, "region": region, "target_name": f"T{region}", "operator": "op", "participant_id": "P01",
            "needle_tip_ras": [1, 2, 3], "needle_direction_ras": [0, 1, 0],
            "notch_roi": {"mode": "tip_distal", "length_mm": 20, "width_mm": 2},
            "values": {"adc": {"mean": 1100, "median": 1090, "min": 800, "sd": 50, "n_voxels": 30, "volume_mm3": 60}},
            "time_utc": "2024-05-01T09:00:00Z"}


def test_specimens_add_export_import_show(tmp_path):
    journal = tmp_path / "j.jsonl"
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps([_record("P01-A", "A"), _record("P01-B", "B")]))
    res = smartbiopsy("specimens", "add", "--journal", journal, "--record", rec)
    assert res.returncode == 0, res.stderr
    assert [json.loads(x)["recorded"] for x in res.stdout.split("\n") if x] == ["P01-A", "P01-B"]

    res = smartbiopsy("specimens", "export", "--journal", journal, "--csv", tmp_path / "e.csv")
    assert res.returncode == 0, res.stderr
    rows = _load_rows(tmp_path / "e.csv")
    assert [r["pot_id"] for r in rows] == ["P01-A", "P01-B"] and float(rows[0]["adc_mean"]) == 1100

    (tmp_path / "path.csv").write_text("pot_id,ki67_percent,nsr,fnclcc_grade\nP01-A,12,0.5,2\nP01-B,40,,3\n")
    res = smartbiopsy("specimens", "import-pathology", "--journal", journal, "--csv", tmp_path / "path.csv")
    assert res.returncode == 0, res.stderr
    assert sorted(json.loads(res.stdout)["added"]) == ["P01-A", "P01-B"]

    res = smartbiopsy("specimens", "show", "--journal", journal)
    state = json.loads(res.stdout)
    assert state["pathology"]["P01-B"]["fnclcc_grade"] == 3 and state["last_seq"] == 3


def test_specimens_bad_input_changes_nothing(tmp_path):
    journal = tmp_path / "j.jsonl"
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps(_record("P01-A", "A")))
    assert smartbiopsy("specimens", "add", "--journal", journal, "--record", rec).returncode == 0
    before = journal.read_bytes()

    assert_user_error(smartbiopsy("specimens", "add", "--journal", journal, "--record", rec), "already recorded")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_record("P01-Z", "Z")))
    assert_user_error(smartbiopsy("specimens", "add", "--journal", journal, "--record", bad), "region")
    bad.write_text("{not json")
    assert_user_error(smartbiopsy("specimens", "add", "--journal", journal, "--record", bad), "not valid JSON")
    assert_user_error(smartbiopsy("specimens", "add", "--journal", journal, "--record", tmp_path / "nope.json"),
                      "does not exist")
    (tmp_path / "p.csv").write_text("pot_id,ki67_percent\nP01-A,12\nP09-X,5\n")
    assert_user_error(smartbiopsy("specimens", "import-pathology", "--journal", journal, "--csv", tmp_path / "p.csv"),
                      "never recorded")
    (tmp_path / "p.csv").write_text("pot_id,ki67_percent\nP01-A,150\n")
    assert_user_error(smartbiopsy("specimens", "import-pathology", "--journal", journal, "--csv", tmp_path / "p.csv"),
                      "outside 0-100")
    assert journal.read_bytes() == before
    assert_user_error(smartbiopsy("specimens", "export", "--journal", tmp_path / "none.jsonl", "--csv", tmp_path / "x.csv"),
                      "does not exist")
    res = smartbiopsy("specimens", "--journal", journal)
    assert res.returncode == 2  # argparse: missing action

"""One set of facts for a run: one total time and one peak memory in summary.json, the report and the console;
a finished report never shows a running step; the phantom truth check in the report; simulated specimen times
before the report and labelled simulated.

The workflow's stages are replaced by quick stand-ins (the report stage runs for real), so these tests check
the plumbing of the facts, not the image processing.
"""
from __future__ import annotations

import csv
import datetime as dt
import html
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from SmartBiopsyLib import workflow
from SmartBiopsyLib.workflow import STAGES, CaseInputs, RunOptions, run_case


def _cells(text: str) -> list[str]:
    return [html.unescape(re.sub(r"<[^>]+>", "", m)) for m in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", text, re.S)]


def _row_value(text: str, item: str) -> str:
    """The value next to the first table cell that starts with ``item``."""
    cells = _cells(text)
    return cells[next(i for i, c in enumerate(cells) if c.startswith(item)) + 1]


def _fake_stages(monkeypatch, truth_line: str | None = None):
    def make(name):
        def stage(run, progress, should_cancel):
            time.sleep(0.02)
            if truth_line and name == "fuse":
                run.truth(truth_line)
            return f"{name} done"
        return stage

    for name in STAGES:
        if name != "report":
            monkeypatch.setattr(workflow, f"_stage_{name}", make(name))


def test_total_time_and_peak_memory_are_one_number_in_summary_report_and_console(tmp_path, monkeypatch, capsys):
    from SmartBiopsyLib.cli.cmd_demo import _print_summary

    _fake_stages(monkeypatch)
    # the hospital export runs inside the report step, before the report is written: its time is in the total
    monkeypatch.setattr(workflow, "_export_for_hospital", lambda run: time.sleep(0.35))
    inputs = CaseInputs(name="FACTS", ct=None, synthetic=True, source="test")
    run = run_case(inputs, tmp_path / "out", RunOptions(export=True))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    total, peak = summary["total_seconds"], summary["peak_memory_mb"]
    assert total + 0.05 >= 0.35 + 0.02 * (len(STAGES) - 1)  # summary.json rounds the total to 0.1 s
    text = (tmp_path / "out" / "report.html").read_text()
    assert _row_value(text, "total time").startswith(f"{total:.1f} s")
    assert _row_value(text, "peak memory") == f"{peak:.0f} MB"
    # the report's step table adds up to the same total
    steps = summary["stages"]
    assert [s["name"] for s in steps] == list(STAGES)
    cells = _cells(text)
    shown = [float(cells[cells.index(s["name"]) + 2]) for s in steps]
    assert sum(shown) == pytest.approx(total, abs=0.06)
    # memory allocated after the report does not change the numbers the console prints
    big = np.ones(60_000_000)
    del big
    _print_summary(run, extra=[("phantom", 12.5, "seed 0"), ("read back", 3.0, "NRRD")])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("total"))
    assert float(line.split()[1]) == pytest.approx(total, abs=0.05)
    assert f"peak memory {peak:.0f} MB" in out
    # what the total covers is stated, the same words in summary.json, the report and on the console
    assert "report" in summary["total_covers"]
    assert summary["total_covers"] in html.unescape(text) and summary["total_covers"] in line


def test_a_finished_report_shows_no_running_step(tmp_path, monkeypatch):
    _fake_stages(monkeypatch)
    run_case(CaseInputs(name="DONE", ct=None, synthetic=False), tmp_path / "out", RunOptions(export=False))
    text = (tmp_path / "out" / "report.html").read_text()
    cells = _cells(text)
    assert "running" not in cells
    assert cells[cells.index("report") + 1] == "done"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert all(s["status"] == "done" for s in summary["stages"])


def test_phantom_truth_check_is_in_summary_and_report_only_for_phantom_cases(tmp_path, monkeypatch):
    line = "registration error vs truth at tumour points: mean 0.42 mm"
    _fake_stages(monkeypatch, truth_line=line)
    run = run_case(CaseInputs(name="PH", ct=None, synthetic=True), tmp_path / "ph", RunOptions(export=False))
    assert line in run.lines  # still printed on the console at the end
    summary = json.loads((tmp_path / "ph" / "summary.json").read_text())
    assert summary["truth_check"]["lines"] == [line]
    text = (tmp_path / "ph" / "report.html").read_text()
    s1 = text[text.index('<h2 id="s1">'):text.index('<h2 id="s2">')]
    assert "Phantom truth check" in s1
    cells = _cells(s1)
    assert cells[cells.index("registration error vs truth at tumour points") + 1] == "mean 0.42 mm"
    run_case(CaseInputs(name="PT", ct=None, synthetic=False), tmp_path / "pt", RunOptions(export=False))
    assert "truth" not in (tmp_path / "pt" / "report.html").read_text().lower()


def _fake_sample(region: str, adc: float):
    st = SimpleNamespace(mean=adc, median=adc, min=adc - 100, sd=50.0, voxels_touched=40, volume_mm3=20.0)
    t = SimpleNamespace(target=region, region=region)
    det = SimpleNamespace(tip_ras=np.array([1.0, 2.0, 3.0]), axis=np.array([0.0, 0.0, 1.0]), tip_error_mm=1.0, angle_deg=2.0)
    roi = SimpleNamespace(to_dict=lambda: {"mode": "side-notch"})
    return t, det, roi, SimpleNamespace(maps={"adc": st, "ef": st, "ff": st})


def test_simulated_specimen_times_end_before_the_report_and_are_labelled(tmp_path):
    from SmartBiopsyLib.report.writer import write_report

    out = tmp_path / "demo"
    (out / "sampling" / "A_simulated").mkdir(parents=True)
    inputs = CaseInputs(name="PHANTOM0000", ct=None, synthetic=True)
    run = workflow.CaseRun(out, inputs, RunOptions(demo_confirmation=True, synthetic_pathology=True,
                                                   operator="demo operator"))
    run.results["samples"] = [_fake_sample(r, a) for r, a in (("A", 800.0), ("B", 1300.0), ("C", 1900.0))]
    before = dt.datetime.now(dt.timezone.utc)
    workflow._stage_record(run, lambda f, m: None, None)
    run.write_summary()
    text = Path(write_report(out)).read_text()
    written = dt.datetime.strptime(re.search(r"Written (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", text).group(1),
                                   "%Y-%m-%d %H:%M").replace(tzinfo=dt.timezone.utc)
    parse = lambda s: dt.datetime.fromisoformat(str(s).replace("Z", "+00:00"))  # noqa: E731
    with open(out / "specimens" / "specimens.csv", newline="") as fh:
        pots = [parse(r["time_utc"]) for r in csv.DictReader(fh)]
    proc = json.loads((out / "specimens" / "procedure.json").read_text())
    scans = [parse(s["time_utc"]) for s in proc["scans"]] + [parse(proc["planning_topogram_utc"])]
    assert len(pots) == 3 and max(pots + scans) <= before
    assert max(pots + scans) <= written  # nothing simulated happens after the report was written
    s6 = text[text.index('<h2 id="s6">'):text.index('<h2 id="s7">')]
    header = _cells(s6)
    assert "time (UTC, simulated)" in header
    assert "Ki-67 (%), synthetic" in header and "grade, synthetic" in header
    s7 = text[text.index('<h2 id="s7">'):text.index('<h2 id="s8">')]
    assert "Simulated procedure record" in s7

"""Specimen chain of custody: journal durability, validation, CSV export and pathology import."""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyLib.records.specimen_journal import (
    JournalCorruptError, MapValues, SpecimenJournal, SpecimenRecord, load_snapshot, read_events,
)

LIB_ROOT = Path(__file__).resolve().parents[2] / "SmartBiopsy"


def make_record(pot="RMH-001-A", region="A", **over) -> dict:
    rec = dict(
        pot_id=pot, region=region, target_name=f"target {region}", participant_id="P01",
        needle_tip_ras=[10.5, -20.25, 33.0], needle_direction_ras=[0.0, 0.0, -2.0],
        notch_roi={"mode": "side_notch", "length_mm": 20.0, "width_mm": 2.0},
        values={"adc": {"mean": 1200.0, "median": 1190.0, "min": 900.0, "sd": 80.0, "n_voxels": 40, "volume_mm3": 63.0},
                "ff": {"mean": 3.0, "median": 2.5, "min": 0.0, "sd": 1.0, "n_voxels": 40, "volume_mm3": 63.0}},
        operator="Dr Test", time_utc="2024-05-01T09:30:00+01:00", notes="",
    )
    rec.update(over)
    return rec


@pytest.fixture()
def journal(tmp_path):
    with SpecimenJournal(tmp_path / "specimens.jsonl") as j:
        yield j


# ----------------------------------------------------------------------------------------------- basic behaviour

def test_records_survive_reopen_and_time_is_normalised_to_utc(journal, tmp_path):
    rec = journal.append_specimen(make_record())
    assert rec.time_utc == "2024-05-01T08:30:00.000Z"
    assert rec.needle_direction_ras == pytest.approx([0.0, 0.0, -1.0])
    journal.append_specimen(make_record("RMH-001-B", "B"))
    with SpecimenJournal(tmp_path / "specimens.jsonl", create=False) as again:
        assert set(again.specimens) == {"RMH-001-A", "RMH-001-B"}
        assert again.specimens["RMH-001-A"].values["adc"] == MapValues(1200.0, 1190.0, 900.0, 80.0, 40, 63.0)
    lines = (tmp_path / "specimens.jsonl").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2]


def test_snapshot_mirrors_journal_state(journal, tmp_path):
    journal.append_specimen(make_record())
    snap = load_snapshot(tmp_path / "specimens.snapshot.json")
    assert snap["last_seq"] == 1
    assert snap["specimens"]["RMH-001-A"]["region"] == "A"
    assert not list(tmp_path.glob(".*.tmp")), "temporary snapshot files must not be left behind"


def test_rejects_duplicate_pot_and_keeps_existing_records(journal, tmp_path):
    journal.append_specimen(make_record())
    size = (tmp_path / "specimens.jsonl").stat().st_size
    with pytest.raises(InputDataError, match="already recorded"):
        journal.append_specimen(make_record(region="B"))
    assert (tmp_path / "specimens.jsonl").stat().st_size == size
    assert journal.specimens["RMH-001-A"].region == "A"


@pytest.mark.parametrize("over, message", [
    ({"region": "D"}, "region"),
    ({"region": None}, "region"),
    ({"pot_id": ""}, "pot ID"),
    ({"pot_id": "pot with spaces"}, "pot ID"),
    ({"operator": "  "}, "operator"),
    ({"needle_tip_ras": [1, 2]}, "three"),
    ({"needle_tip_ras": [1, "x", 3]}, "not a number"),
    ({"needle_direction_ras": [0, 0, 0]}, "zero vector"),
    ({"time_utc": "2024-05-01 09:30"}, "time zone"),
    ({"time_utc": "yesterday"}, "ISO 8601"),
    ({"values": {}}, "no map values"),
    ({"values": {"adc": {"mean": 1.0}}}, "lack"),
    ({"values": {"adc": {"mean": "high", "median": 1, "min": 0, "sd": 1, "n_voxels": 3, "volume_mm3": 1}}}, "not a number"),
    ({"values": {"adc": {"mean": float("nan"), "median": 1, "min": 0, "sd": 1, "n_voxels": 3, "volume_mm3": 1}}}, "finite"),
    ({"values": {"adc": {"mean": 1, "median": 1, "min": 0, "sd": -1, "n_voxels": 3, "volume_mm3": 1}}}, "negative"),
    ({"values": {"adc": {"mean": 1, "median": 1, "min": 0, "sd": 1, "n_voxels": 0, "volume_mm3": 1}}}, "no voxels"),
    ({"values": {"adc": {"mean": 1, "median": 1, "min": 0, "sd": 1, "n_voxels": 2.5, "volume_mm3": 1}}}, "whole number"),
    ({"values": {"adc": {"mean": 1, "median": 1, "min": 5, "sd": 1, "n_voxels": 3, "volume_mm3": 1}}}, "minimum"),
    ({"values": {"bad name!": {"mean": 1, "median": 1, "min": 0, "sd": 1, "n_voxels": 3, "volume_mm3": 1}}}, "map name"),
    ({"notch_roi": "side"}, "notch ROI"),
    ({"unexpected": 1}, "unknown fields"),
])
def test_rejects_malformed_records_without_writing(journal, tmp_path, over, message):
    journal.append_specimen(make_record("KEEP-1"))
    before = (tmp_path / "specimens.jsonl").read_bytes()
    with pytest.raises(InputDataError, match=message):
        journal.append_specimen(make_record("NEW-1", **over))
    assert (tmp_path / "specimens.jsonl").read_bytes() == before
    assert set(journal.specimens) == {"KEEP-1"}


def test_rejects_folder_and_missing_journal(tmp_path):
    with pytest.raises(InputDataError, match="folder"):
        SpecimenJournal(tmp_path)
    with pytest.raises(InputDataError, match="does not exist"):
        SpecimenJournal(tmp_path / "none.jsonl", create=False)
    with pytest.raises(InputDataError, match="does not exist"):
        SpecimenJournal(tmp_path / "no" / "such" / "dir.jsonl")


# ----------------------------------------------------------------------------------------------- torn / corrupt

def test_torn_last_line_is_ignored_with_warning_and_cut_on_next_append(tmp_path, caplog):
    path = tmp_path / "specimens.jsonl"
    with SpecimenJournal(path) as j:
        j.append_specimen(make_record("P-1"))
        j.append_specimen(make_record("P-2"))
    full = path.read_bytes()
    second = full.splitlines(keepends=True)[1]
    path.write_bytes(full + second[: len(second) // 2])  # a third line torn mid-write
    with caplog.at_level(logging.WARNING):
        j = SpecimenJournal(path)
    assert "incomplete" in caplog.text
    assert set(j.specimens) == {"P-1", "P-2"}
    j.append_specimen(make_record("P-3"))
    j.close()
    events, torn, _ = read_events(path)
    assert not torn
    assert [e.seq for e in events] == [1, 2, 3]
    assert (tmp_path / "specimens.jsonl.torn").exists()


def test_complete_line_without_newline_counts_as_torn(tmp_path):
    path = tmp_path / "specimens.jsonl"
    with SpecimenJournal(path) as j:
        j.append_specimen(make_record("P-1"))
        j.append_specimen(make_record("P-2"))
    path.write_bytes(path.read_bytes()[:-1])
    events, torn, _ = read_events(path, warn=False)
    assert torn and [e.seq for e in events] == [1]


def test_damage_inside_the_journal_is_refused(tmp_path):
    path = tmp_path / "specimens.jsonl"
    with SpecimenJournal(path) as j:
        for i in range(3):
            j.append_specimen(make_record(f"P-{i}"))
    lines = path.read_bytes().splitlines(keepends=True)
    tampered = lines[1].replace(b'"region":"A"', b'"region":"B"')
    assert tampered != lines[1]
    path.write_bytes(lines[0] + tampered + lines[2])
    with pytest.raises(JournalCorruptError, match="line 2.*checksum"):
        SpecimenJournal(path)
    path.write_bytes(lines[0] + lines[2])  # a line missing: sequence gap
    with pytest.raises(JournalCorruptError, match="sequence"):
        SpecimenJournal(path)


# ----------------------------------------------------------------------------------------------- crash test

WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from SmartBiopsyLib.records.specimen_journal import SpecimenJournal
    j = SpecimenJournal(sys.argv[1])
    i = len(j.specimens)
    while True:
        pot = f"CR-{i:05d}"
        j.append_specimen({
            "pot_id": pot, "region": "ABC"[i % 3], "target_name": "t", "operator": "op",
            "needle_tip_ras": [i, 0, 0], "needle_direction_ras": [0, 0, 1], "notch_roi": {"mode": "tip_distal"},
            "values": {"adc": {"mean": float(i), "median": float(i), "min": 0.0, "sd": 1.0, "n_voxels": 5,
                               "volume_mm3": 10.0}},
        })
        sys.stdout.write(pot + "\\n")
        sys.stdout.flush()
        i += 1
""")


def test_acknowledged_records_survive_repeated_sigkill(tmp_path):
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)
    journal = tmp_path / "crash.jsonl"
    rng = random.Random(7)
    acknowledged: list[str] = []
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, str(writer), str(journal), str(LIB_ROOT)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        want = rng.randint(1, 4)
        got = 0
        try:
            while got < want:
                line = proc.stdout.readline()
                if not line:
                    raise AssertionError(f"writer stopped early: {proc.stderr.read()}")
                acknowledged.append(line.strip())
                got += 1
            os.kill(proc.pid, signal.SIGKILL)  # mid-way through the next append
            rest = proc.stdout.read()  # acknowledgements printed before the kill landed
            acknowledged.extend(x for x in rest.split() if x)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()
        with SpecimenJournal(journal) as j:  # the journal stays readable after every kill
            missing = set(acknowledged) - set(j.specimens)
            assert not missing, f"acknowledged records lost: {sorted(missing)}"
        snap_path = tmp_path / "crash.snapshot.json"
        if snap_path.exists():
            snap = json.loads(snap_path.read_text())  # never half-written
            assert snap["last_seq"] <= len(j.specimens)
    assert len(acknowledged) >= 20
    assert len(list(tmp_path.glob(".crash.snapshot.json.*.tmp"))) <= 1
    assert len(set(acknowledged)) == len(acknowledged)


# ----------------------------------------------------------------------------------------------- export / import

def _write_csv(path, rows, header=("pot_id", "ki67_percent", "nsr", "fnclcc_grade")):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture()
def three_pots(journal):
    for r in "ABC":
        journal.append_specimen(make_record(f"P01-{r}", r))
    return journal


def test_export_csv_has_one_row_per_pot_with_map_values(three_pots, tmp_path):
    out = three_pots.export_csv(tmp_path / "for_pathology.csv")
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert [r["pot_id"] for r in rows] == ["P01-A", "P01-B", "P01-C"]
    assert float(rows[0]["adc_mean"]) == pytest.approx(1200.0)
    assert float(rows[1]["ff_sd"]) == pytest.approx(1.0)
    assert float(rows[0]["tip_a_mm"]) == pytest.approx(-20.25)
    assert rows[0]["ki67_percent"] == ""
    assert json.loads(rows[0]["notch_roi"])["mode"] == "side_notch"


def test_export_refuses_empty_journal_and_unknown_map(journal, three_pots, tmp_path):
    with SpecimenJournal(tmp_path / "empty.jsonl") as empty:
        with pytest.raises(InputDataError, match="no specimens"):
            empty.export_csv(tmp_path / "x.csv")
    with pytest.raises(InputDataError, match="never measured"):
        three_pots.export_csv(tmp_path / "x.csv", maps=["ef"])


def test_export_neutralises_spreadsheet_formulas(journal, tmp_path):
    journal.append_specimen(make_record(operator="=HYPERLINK(\"x\")"))
    rows = list(csv.DictReader(open(journal.export_csv(tmp_path / "o.csv"), encoding="utf-8")))
    assert rows[0]["operator"].startswith("'=")


def test_pathology_import_then_correction_appends_new_event(three_pots, tmp_path):
    rep = three_pots.import_pathology_csv(_write_csv(tmp_path / "p1.csv", [
        ["P01-A", "12.5", "0.4", "2"], ["P01-B", "30%", "", "3"], ["P01-C", "5", "1.5", ""]]))
    assert sorted(rep.added) == ["P01-A", "P01-B", "P01-C"] and not rep.corrected
    assert three_pots.pathology["P01-B"].ki67_percent == pytest.approx(30.0)
    assert three_pots.pathology["P01-B"].nsr is None
    lines_before = (tmp_path / "specimens.jsonl").read_bytes()
    rep2 = three_pots.import_pathology_csv(_write_csv(tmp_path / "p2.csv", [
        ["P01-A", "12.5", "0.4", "2"], ["P01-C", "7", "1.5", ""]]))
    assert rep2.corrected == ["P01-C"] and rep2.unchanged == ["P01-A"] and not rep2.added
    after = (tmp_path / "specimens.jsonl").read_bytes()
    assert after.startswith(lines_before), "earlier journal lines must never be rewritten"
    with SpecimenJournal(tmp_path / "specimens.jsonl") as again:
        assert again.pathology["P01-C"].ki67_percent == pytest.approx(7.0)
        assert again.pathology["P01-C"].corrects_seq == rep.seq
        assert [p.ki67_percent for p in again.state.pathology_history["P01-C"]] == [5.0, 7.0]
    rep3 = three_pots.import_pathology_csv(tmp_path / "p2.csv")
    assert rep3.seq is None and (tmp_path / "specimens.jsonl").read_bytes() == after


@pytest.mark.parametrize("rows, message", [
    ([["P99-X", "10", "1", "2"]], "never recorded"),
    ([["P01-A", "10", "1", "2"], ["P01-A", "11", "1", "2"]], "already given in row 3"),
    ([["P01-A", "101", "1", "2"]], "outside 0-100"),
    ([["P01-A", "-1", "1", "2"]], "outside"),
    ([["P01-A", "10", "-0.5", "2"]], "nsr"),
    ([["P01-A", "ten", "1", "2"]], "not a number"),
    ([["P01-A", "10", "1", "4"]], "FNCLCC"),
    ([["P01-A", "10", "1", "2.5"]], "FNCLCC"),
    ([["P01-A", "nan", "1", "2"]], "finite"),
    ([["P01-A", "", "", ""]], "no pathology value"),
    ([["bad pot", "1", "1", "1"]], "not valid"),
    ([], "no result rows"),
])
def test_rejects_bad_pathology_rows_and_imports_nothing(three_pots, tmp_path, rows, message):
    before = (tmp_path / "specimens.jsonl").read_bytes()
    good = [["P01-B", "20", "0.5", "1"]]  # a valid row in the same file must not be imported either
    with pytest.raises(InputDataError, match=message):
        three_pots.import_pathology_csv(_write_csv(tmp_path / "bad.csv", good + rows if rows else []))
    assert (tmp_path / "specimens.jsonl").read_bytes() == before
    assert three_pots.pathology == {}


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\xff\xfe\x00garbage", "UTF-8"),
    (b"specimen,value\nP01-A,3\n", "pot ID column"),
    (b"pot_id,comment\nP01-A,ok\n", "no result column"),
    (b"pot_id,ki67,ki67_percent\nP01-A,1,2\n", "twice"),
    (b"pot_id,ki67\nP01-A,1,2,3\n", "cells"),
])
def test_rejects_malformed_pathology_files(three_pots, tmp_path, content, message):
    p = tmp_path / "bad.csv"
    p.write_bytes(content)
    with pytest.raises(InputDataError, match=message):
        three_pots.import_pathology_csv(p)
    with pytest.raises(InputDataError, match="does not exist"):
        three_pots.import_pathology_csv(tmp_path / "missing.csv")


def test_pathology_header_aliases_and_semicolons(three_pots, tmp_path):
    p = tmp_path / "lab.csv"
    p.write_text("Pot ID;Ki-67;Grade\nP01-A;15;3\n", encoding="utf-8")
    three_pots.import_pathology_csv(p)
    assert three_pots.pathology["P01-A"].fnclcc_grade == 3
    assert three_pots.pathology["P01-A"].ki67_percent == pytest.approx(15.0)


def test_record_roundtrip_dict(journal):
    rec = journal.append_specimen(make_record())
    again = SpecimenRecord.from_dict(rec.to_dict())
    assert again == rec


def test_numpy_values_in_records_are_stored_as_plain_numbers(journal):
    import numpy as np
    rec = make_record(notch_roi={"mode": "tip_distal", "corners_ras": np.arange(6.0).reshape(2, 3)},
                      needle_tip_ras=np.array([1.0, 2.0, 3.0]),
                      values={"adc": {"mean": np.float64(1000), "median": np.float32(990), "min": np.int64(700),
                                      "sd": np.float64(20), "n_voxels": np.int64(12), "volume_mm3": np.float64(24)}})
    saved = journal.append_specimen(rec)
    assert saved.notch_roi["corners_ras"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert saved.values["adc"].n_voxels == 12 and type(saved.values["adc"].n_voxels) is int
    with pytest.raises(InputDataError, match="cannot be stored"):
        journal.append_specimen(make_record("X-2", notch_roi={"corner": np.array([np.nan, 0, 0])}))


def test_two_writers_see_each_others_records(tmp_path):
    path = tmp_path / "shared.jsonl"
    with SpecimenJournal(path) as first, SpecimenJournal(path) as second:
        first.append_specimen(make_record("W-1"))
        second.append_specimen(make_record("W-2"))
        with pytest.raises(InputDataError, match="already recorded"):
            first.append_specimen(make_record("W-2"))
        first.append_specimen(make_record("W-3"))
    events, torn, _ = read_events(path)
    assert [e.seq for e in events] == [1, 2, 3] and not torn


def test_values_from_notch_carries_every_map_statistic():
    import numpy as np

    from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
    from SmartBiopsyLib.sampling.notch import notch_roi, sample_maps
    from SmartBiopsyLib.records.specimen_journal import values_from_notch

    grid = make_grid((-20, -20, -20), (1.0, 1.0, 2.0), (21, 41, 41))
    adc = RasVolume(np.full((21, 41, 41), 900.0, np.float32), grid, "adc", {"units": "1e-6 mm^2/s"})
    roi = notch_roi([0, 0, 5], [0, 0, -1], "tip-distal")
    nv = sample_maps(roi, {"adc": adc})
    vals = values_from_notch(nv)
    assert set(vals) == {"adc"}
    v = vals["adc"]
    assert abs(v.mean - 900.0) < 1e-3 and v.sd < 1e-3 and v.n_voxels == nv.maps["adc"].voxels_touched
    assert abs(v.volume_mm3 - np.pi * 1.0 ** 2 * 20.0) < 0.05 * np.pi * 20.0

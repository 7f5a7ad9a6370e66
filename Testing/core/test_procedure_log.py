"""Procedure log: dose, 60-minute window, needle manipulations, CTCAE adverse events, storage in the journal."""
from __future__ import annotations

import json

import pytest

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyLib.records.procedure_log import ProcedureLog
from SmartBiopsyLib.records.specimen_journal import SpecimenJournal


def make_log(last_scan="2024-05-01T09:52:30Z") -> ProcedureLog:
    log = ProcedureLog(participant_id="P01", operator="Dr Test")
    log.set_planning_topogram("2024-05-01T10:00:00+01:00")  # = 09:00Z
    log.add_scan("planning", "2024-05-01T09:01:00Z", 412.5)
    log.add_scan("confirmation A", "2024-05-01T09:20:00Z", 38.2)
    log.add_scan("final", last_scan, 40.1)
    return log


def test_total_dlp_is_sum_of_scans():
    log = make_log()
    assert log.total_dlp_mgy_cm == pytest.approx(412.5 + 38.2 + 40.1)
    assert [s.label for s in log.scans] == ["planning", "confirmation A", "final"]


@pytest.mark.parametrize("last_scan, minutes, exceeded", [
    ("2024-05-01T09:52:30Z", 52.5, False),
    ("2024-05-01T10:00:00Z", 60.0, False),
    ("2024-05-01T10:00:01Z", 60.0 + 1 / 60, True),
    ("2024-05-01T11:15:00+01:00", 75.0, True),
])
def test_sixty_minute_window_flag(last_scan, minutes, exceeded):
    log = make_log(last_scan)
    assert log.elapsed_min == pytest.approx(minutes)
    assert log.window_exceeded is exceeded


def test_window_unknown_until_topogram_and_scan_recorded():
    log = ProcedureLog()
    assert log.elapsed_min is None and log.window_exceeded is None
    log.add_scan("planning", "2024-05-01T09:01:00Z", 400)
    assert log.window_exceeded is None


def test_manipulations_and_adverse_events_roundtrip_through_journal(tmp_path):
    log = make_log()
    log.add_manipulation("A")
    log.add_manipulation("b", 2)
    log.add_adverse_event("Hemorrhage", 1, "2024-05-01T09:40:00Z", attribution="definite")
    log.add_adverse_event("Pain", "2")
    assert log.manipulations == {"A": 1, "B": 2, "C": 0} and log.total_manipulations == 3
    d = log.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["max_ctcae_grade"] == 2 and d["window_exceeded"] is False
    with SpecimenJournal(tmp_path / "j.jsonl") as j:
        j.append_procedure(log)
    with SpecimenJournal(tmp_path / "j.jsonl") as j:
        again = ProcedureLog.from_dict(j.state.procedure)
    assert again.to_dict() == d


@pytest.mark.parametrize("action, message", [
    (lambda l: l.add_scan("x", "2024-05-01T09:30:00Z", -1), "negative"),
    (lambda l: l.add_scan("x", "2024-05-01T09:30:00Z", 41250), "unit"),
    (lambda l: l.add_scan("x", "2024-05-01T09:30:00Z", "abc"), "not a number"),
    (lambda l: l.add_scan("x", "2024-05-01T09:30:00Z", float("nan")), "finite"),
    (lambda l: l.add_scan("x", "2024-05-01 09:30", 10), "time zone"),
    (lambda l: l.add_scan("x", "2024-05-01T08:30:00Z", 10), "before the planning topogram"),
    (lambda l: l.add_scan("", "2024-05-01T09:30:00Z", 10), "label"),
    (lambda l: l.set_planning_topogram("2024-05-01T09:30:00Z"), "precede"),
    (lambda l: l.add_manipulation("D"), "region"),
    (lambda l: l.add_manipulation("A", 0), "at least 1"),
    (lambda l: l.add_manipulation("A", 1.5), "whole number"),
    (lambda l: l.add_adverse_event("Pain", 6), "1-5"),
    (lambda l: l.add_adverse_event("Pain", 0), "1-5"),
    (lambda l: l.add_adverse_event("Pain", 2.5), "whole number"),
    (lambda l: l.add_adverse_event("Pain", "severe"), "1-5"),
    (lambda l: l.add_adverse_event("Pain", True), "1-5"),
    (lambda l: l.add_adverse_event("", 1), "term"),
])
def test_rejects_bad_entries_and_keeps_log_unchanged(action, message):
    log = make_log()
    before = log.to_dict()
    with pytest.raises(InputDataError, match=message):
        action(log)
    assert log.to_dict() == before


def test_rejects_bad_window_and_malformed_dict():
    with pytest.raises(InputDataError, match="positive"):
        ProcedureLog(window_min=0)
    with pytest.raises(InputDataError, match="mapping"):
        ProcedureLog.from_dict([1, 2])
    with pytest.raises(InputDataError, match="1-5"):
        ProcedureLog.from_dict({"adverse_events": [{"term": "Pain", "grade": 7}]})

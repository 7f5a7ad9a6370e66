"""Strictly valid JSON everywhere (no NaN/Infinity) and output folders written as a transaction."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from SmartBiopsyCoreLib.dataio.jsonio import dumps, loads_strict, write_json
from SmartBiopsyCoreLib.dataio.outdir import OutputFolder, check_output_folder
from SmartBiopsyCoreLib.errors import InputDataError

ROOT = Path(__file__).resolve().parents[2]
LIBS = [ROOT / m for m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner")]


def test_write_json_turns_non_finite_values_into_null_with_a_reason(tmp_path):
    doc = {"tip_error_mm": float("nan"), "angle_deg": np.float64(np.inf), "ok": np.float32(1.5),
           "points": np.array([[1.0, np.nan], [2.0, 3.0]]), "n": np.int64(3), "flag": np.bool_(True)}
    path = write_json(tmp_path / "needle.json", doc)
    data = loads_strict(path.read_text())
    assert data["tip_error_mm"] is None and data["angle_deg"] is None and data["points"] == [[1.0, None], [2.0, 3.0]]
    assert data["ok"] == 1.5 and data["n"] == 3 and data["flag"] is True
    assert set(data["null_reasons"]) == {"$.tip_error_mm", "$.angle_deg", "$.points[0][1]"}
    assert "nan" in data["null_reasons"]["$.tip_error_mm"]
    assert not list(tmp_path.glob("*.tmp"))


def test_finite_documents_are_written_unchanged():
    doc = {"a": [1, 2.5, "x", None, True], "b": {"c": -0.0}}
    assert json.loads(dumps(doc)) == doc and "null_reasons" not in dumps(doc, with_reasons=True)


def test_strict_parser_refuses_nan():
    with pytest.raises(ValueError):
        loads_strict('{"x": NaN}')


def _json_writes(text: str):
    """(line number, call text) of every json.dump/json.dumps call, with its arguments up to the closing bracket."""
    for m in re.finditer(r"\bjson\.dumps?\(", text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        yield text.count("\n", 0, m.start()) + 1, text[m.start():i + 1]


def test_every_json_writer_of_the_project_refuses_nan():
    """Every JSON the project writes goes through SmartBiopsyCoreLib.dataio.jsonio (NaN -> null plus a reason) or
    is written with allow_nan=False; a bare json.dump/json.dumps could write NaN, which is not JSON."""
    bad = []
    for lib in LIBS:
        for path in lib.rglob("*.py"):
            if path.name == "jsonio.py":
                continue
            for line, call in _json_writes(path.read_text(encoding="utf-8")):
                if "allow_nan=False" not in call:
                    bad.append(f"{path.relative_to(ROOT)}:{line}")
    assert not bad, "JSON written without the strict writer (use SmartBiopsyCoreLib.dataio.jsonio): " + ", ".join(bad)


# ---------------------------------------------------------------------------------------------- output folders
def _make_read_only(folder: Path) -> None:
    """Read-only even for root (immutable attribute), else skip."""
    os.chmod(folder, 0o555)
    probe = folder / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return
    probe.unlink()
    res = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if res.returncode != 0:
        pytest.skip("cannot make a folder read-only here (running as root without chattr)")


def _undo_read_only(folder: Path) -> None:
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    os.chmod(folder, 0o755)


def test_output_folder_in_a_read_only_place_is_refused_with_one_sentence(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    _make_read_only(ro)
    try:
        for out in (ro, ro / "new" / "case"):
            with pytest.raises(InputDataError, match="not writable") as info:
                check_output_folder(out)
            assert "\n" not in str(info.value)
    finally:
        _undo_read_only(ro)


def test_output_folder_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputDataError, match="not a folder"):
        check_output_folder(f)
    with pytest.raises(InputDataError, match="is a file"):
        check_output_folder(f / "sub")


def test_commit_replaces_the_earlier_run_and_removes_what_it_did_not_rewrite(tmp_path):
    out = tmp_path / "case"
    (out / "registration").mkdir(parents=True)
    (out / "registration" / "qa.json").write_text('{"passed": true}')
    (out / "scene.mrb").write_text("old scene")
    (out / "summary.json").write_text("old")
    (out / "operator_notes.txt").write_text("not ours")
    folder = OutputFolder(out, owned=("registration", "scene.mrb", "summary.json", "report.html"))
    stage = folder.begin()
    assert stage.parent == tmp_path and not stage.is_relative_to(out)
    (stage / "summary.json").write_text("new")
    assert (out / "scene.mrb").read_text() == "old scene"  # nothing replaced before the commit
    folder.commit()
    assert (out / "summary.json").read_text() == "new"
    assert not (out / "scene.mrb").exists() and not (out / "registration").exists()
    assert (out / "operator_notes.txt").read_text() == "not ours"
    assert sorted(folder.removed) == ["registration", "scene.mrb"] and folder.replaced == ["summary.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["case"]


def test_paths_into_the_staging_folder_are_rewritten_to_the_output_folder(tmp_path):
    out = tmp_path / "case"
    folder = OutputFolder(out)
    stage = folder.begin()
    (stage / "robot").mkdir()
    (stage / "robot" / "session.json").write_text(json.dumps({"log_path": str(stage / "robot" / "session.jsonl")}))
    folder.commit()
    assert json.loads((out / "robot" / "session.json").read_text())["log_path"] == str(
        out.absolute() / "robot" / "session.jsonl")


def test_a_command_that_writes_nothing_leaves_no_new_folder(tmp_path):
    out = tmp_path / "a" / "b" / "case"
    folder = OutputFolder(out)
    folder.begin()
    folder.commit()
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []


def test_stages_inside_the_output_folder_when_only_it_is_writable(tmp_path):
    parent = tmp_path / "parent"
    out = parent / "case"
    out.mkdir(parents=True)
    (out / "scene.mrb").write_text("old")
    _make_read_only(parent)
    try:
        folder = OutputFolder(out, owned=("scene.mrb", "summary.json"))
        stage = folder.begin()
        assert stage.parent == out
        (stage / "summary.json").write_text("new")
        folder.commit()
        assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    finally:
        _undo_read_only(parent)


def test_no_nan_survives_the_round_trip_of_a_result_object():
    class Result:
        def to_dict(self):
            return {"fre_mm": math.nan, "loo_mm": [0.1, math.inf]}

    data = loads_strict(dumps({"fusion": Result()}, with_reasons=True))
    assert data["fusion"] == {"fre_mm": None, "loo_mm": [0.1, None]} and len(data["null_reasons"]) == 2

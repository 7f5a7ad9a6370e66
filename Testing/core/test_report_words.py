"""The report speaks a radiologist's words: no internal identifier in any table cell, one mapping table
(SmartBiopsyLib.report.words), the robot's reply not shown as the target's final state, and the refinement
message that says whose residual each number is."""
from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest

from report_case import build_case
from SmartBiopsyLib.report.writer import write_report

#: an internal identifier: snake_case (needle_length, bowel_gas) or kind:name (clearance:bone)
IDENTIFIER = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b|\b[a-z_]+:[a-z_]+\b")


def _cells(text: str) -> list[str]:
    return [html.unescape(re.sub(r"<[^>]+>", "", m)) for m in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", text, re.S)]


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    build_case(root)
    return root


@pytest.fixture(scope="module")
def report_text(case_dir):
    return Path(write_report(case_dir)).read_text(encoding="utf-8")


def test_no_internal_identifier_in_any_report_table_cell(report_text):
    bad = [c for c in _cells(report_text) if IDENTIFIER.search(c)]
    assert not bad, bad[:5]
    # the rejections the planner counted are there, in words
    cells = _cells(report_text)
    assert any("longer than the needle reaches" in c for c in cells)
    assert any("too close to bone" in c for c in cells)


def test_every_planner_reason_and_structure_has_plain_words():
    from SmartBiopsyLib.report.words import plain
    from TrajectoryPlannerLib.planning.risk import DEFAULT_MARGINS_MM

    names = ["needle_length", "angle_to_axial", "entry_region", "leaves_body"]
    names += [f"clearance:{s}" for s in DEFAULT_MARGINS_MM] + list(DEFAULT_MARGINS_MM)
    for name in names:
        words = plain(name)
        assert words and not IDENTIFIER.search(words) and ":" not in words, (name, words)
    assert plain("clearance:bowel_gas") == "too close to bowel gas"
    assert plain("needle_length") == "longer than the needle reaches"
    assert plain("ivc") == "inferior vena cava"
    assert plain("A-1") == "A-1" and plain(None) == ""


def test_robot_reply_is_not_shown_as_the_final_state(case_dir, tmp_path):
    root = tmp_path / "case"
    shutil.copytree(case_dir, root, ignore=shutil.ignore_patterns("report.html", "figures"))
    sess = json.loads((root / "robot" / "session.json").read_text())
    for k, t in enumerate(sess["targets"]):
        t["robot_status"], t["state"] = f"target {k + 1} reachable", "reached"
    (root / "robot" / "session.json").write_text(json.dumps(sess))
    text = Path(write_report(root)).read_text(encoding="utf-8")
    s7 = text[text.index('<h2 id="s7">'):text.index('<h2 id="s8">')]
    table = next(t for t in re.findall(r"<table>.*?</table>", s7, re.S) if "echo error" in t)
    header = _cells(re.search(r"<tr>(.*?)</tr>", table, re.S).group(1))
    rows = [_cells(r) for r in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]]
    status = header.index("final state")
    reply = next(i for i, h in enumerate(header) if "reachable" in rows[0][i])
    assert all(r[status] == "reached" for r in rows)
    assert "when the target was sent" in header[reply] and header[reply] != "robot status"
    # the calibration table names the frame, not its JSON
    assert not any(c.startswith("{") for c in _cells(s7))


def test_kept_landmark_message_states_its_own_residual_before_the_rejected_numbers():
    from RegistrationFusionLib.registration.refine import kept_landmark_reason

    msg = kept_landmark_reason(["it would leave capsule 0 2.02 mm from its CT position, more than the 0.50 mm "
                                "its localisation error allows"], [0.10, 0.20, 0.15])
    assert msg.startswith("intensity refinement rejected, landmark registration kept")
    assert "its capsule residual is 0.16 mm RMS (worst 0.20 mm)" in msg
    kept, rejected = msg.split("The rejected refinement:")
    assert "2.02" in rejected and "2.02" not in kept

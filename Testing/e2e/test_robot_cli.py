"""``smartbiopsy robot-sim`` and ``smartbiopsy robot-send`` as a user runs them (separate processes, loopback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CLI, cli_env

ROOT = Path(__file__).resolve().parents[2]
ENV = cli_env()

PLAN = {
    "trajectories": [
        {"name": "A", "region": "A", "entry_ras": [-30.0, 60.0, 90.0], "target_ras": [-10.0, 15.0, 40.0],
         "length_mm": 70.0},
        {"name": "B", "region": "B", "entry_ras": [0.0, 70.0, 95.0], "target_ras": [5.0, 20.0, 35.0]},
        {"name": "C", "region": "C", "entry_ras": [35.0, 65.0, 85.0], "target_ras": [20.0, 12.0, 45.0]},
    ],
    "registration_qa": {"passed": True, "failures": [], "thresholds": {"max_predicted_tre_mm": 3.0},
                        "targets": [{"name": n, "predicted_tre_mm": 1.2} for n in "ABC"]},
}


class Sim:
    def __init__(self, *extra):
        self.proc = subprocess.Popen(CLI + ["--quiet", "robot-sim", "--port", "0", "--duration", "60",
                                            "--speed", "2000", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        line = self.proc.stdout.readline()
        assert line.startswith("robot-sim listening on 127.0.0.1:"), line + self.proc.stderr.read()
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> dict:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=20)
        return json.loads(out.strip().splitlines()[-1])


def _send(tmp_path, port, plan=PLAN, *extra):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    if "--calibration" not in extra and "--no-frame" not in extra:
        extra = ("--robot-frame", "ct", *extra)
    extra = tuple(x for x in extra if x != "--no-frame")
    return subprocess.run(CLI + ["--quiet", "robot-send", "--port", str(port), "--plan", str(p), *extra],
                          capture_output=True, text=True, timeout=120, env=ENV)


def test_robot_send_runs_three_targets_against_the_simulator(tmp_path):
    sim = Sim()
    try:
        r = _send(tmp_path, sim.port, PLAN, "--confirm", "--log", str(tmp_path / "s.jsonl"))
    finally:
        summary = sim.stop()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [t["state"] for t in out["targets"]] == ["reached"] * 3
    assert all(t["reached_error_mm"] < 0.01 for t in out["targets"])
    robot = summary["robot_sim"]["targets"]
    assert len(robot) == 3 and all(v["receipts"] == 1 for v in robot.values())
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert sum(1 for x in lines if '"dir": "sent"' in x and '"TGT_' in x) == 3


def test_robot_send_refuses_without_confirm_and_sends_nothing(tmp_path):
    sim = Sim()
    try:
        r = _send(tmp_path, sim.port, PLAN)
    finally:
        summary = sim.stop()
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: robot-send can move the robot")
    assert summary["robot_sim"]["commands"] == []


def test_robot_send_refuses_when_registration_qa_failed(tmp_path):
    sim = Sim()
    try:
        r = _send(tmp_path, sim.port, {**PLAN, "registration_qa": {"passed": False}}, "--confirm")
    finally:
        summary = sim.stop()
    assert r.returncode == 2 and "registration QA did not pass" in r.stderr
    assert summary["robot_sim"]["commands"] == []


def test_unreachable_target_is_reported_with_the_robot_text(tmp_path):
    sim = Sim("--fault", "unreachable:target=2")
    try:
        r = _send(tmp_path, sim.port, PLAN, "--confirm")
    finally:
        sim.stop()
    assert r.returncode == 3
    assert "target B unreachable: target 2 unreachable" in r.stderr
    states = [t["state"] for t in json.loads(r.stdout)["targets"]]
    assert states == ["reached", "unreachable", "reached"]


def test_robot_refusal_is_an_error_line_with_the_robot_text(tmp_path):
    sim = Sim("--fault", "refuse:phase=PLANNING")
    try:
        r = _send(tmp_path, sim.port, PLAN, "--confirm", "--ack-timeout", "0.5")
    finally:
        sim.stop()
    assert r.returncode == 2
    assert "error: The robot refused PLANNING: PLANNING refused by the robot" in r.stderr


def test_robot_send_without_robot_is_a_clear_error(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = _send(tmp_path, port, PLAN, "--confirm")
    assert r.returncode == 2 and "Cannot connect to the robot" in r.stderr


def test_robot_send_rejects_a_corrupt_plan(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text('{"trajectories": [')
    r = subprocess.run(CLI + ["robot-send", "--port", "1", "--plan", str(p), "--confirm"], capture_output=True,
                       text=True, timeout=60, env=ENV)
    assert r.returncode == 2 and "not readable JSON" in r.stderr

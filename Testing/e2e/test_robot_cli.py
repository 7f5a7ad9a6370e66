"""``smartbiopsy robot-sim`` and ``smartbiopsy robot-send`` as a user runs them (separate processes, loopback)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


def _planner_plan():
    """plan.json as ``smartbiopsy plan`` writes it: five ranked paths per target."""
    trajs = []
    for k, (name, base) in enumerate(zip("ABC", PLAN["trajectories"])):
        for r in range(1, 6):
            entry = [base["entry_ras"][0] + 3.0 * (r - 1), base["entry_ras"][1], base["entry_ras"][2]]
            trajs.append({"name": f"{name}-{r}", "target": name, "region": name, "rank": r, "entry_ras": entry,
                          "target_ras": base["target_ras"], "length_mm": 70.0, "score": 1.0 - 0.1 * r})
    return {"trajectories": trajs, "shared_entry": None, "registration_qa": PLAN["registration_qa"],
            "needle": {"name": "coaxial", "core": {"usable_length_mm": 150.0}}}


def _robot_entries(summary_sim, plan, names):
    return [next(t for t in plan["trajectories"] if t["name"] == n) for n in names]


def test_robot_send_takes_the_planners_plan_best_path_per_target_by_default_or_paths(tmp_path):
    plan = _planner_plan()
    sim = Sim("--log", str(tmp_path / "sim.jsonl"))
    try:
        r = _send(tmp_path, sim.port, plan, "--confirm")
        r2 = _send(tmp_path, sim.port, plan, "--confirm", "--paths", "A-2,B-1,C-5")
    finally:
        sim.stop()
    assert r.returncode == 0, r.stderr
    assert [t["name"] for t in json.loads(r.stdout)["targets"]] == ["A-1", "B-1", "C-1"]
    assert r2.returncode == 0, r2.stderr
    assert [t["name"] for t in json.loads(r2.stdout)["targets"]] == ["A-2", "B-1", "C-5"]
    assert [t["state"] for t in json.loads(r2.stdout)["targets"]] == ["reached"] * 3


def test_robot_send_refuses_ambiguous_plans_listing_the_choices(tmp_path):
    plan = _planner_plan()
    plan["trajectories"][1]["rank"] = 1                     # both rank 1
    r = _send(tmp_path, 1, plan, "--confirm")
    assert r.returncode == 2
    assert "several paths for target A without one best rank; choose one with --paths from A-1 (target A, rank 1)" \
        in r.stderr
    r = _send(tmp_path, 1, _planner_plan(), "--confirm", "--paths", "A-1,D-1")
    assert r.returncode == 2 and "Path D-1 is not in the plan; choose from A-1" in r.stderr


@pytest.mark.parametrize("qa, message", [
    ({"passed": "false"}, "did not pass"),
    ({"passed": "no"}, "did not pass"),
    ({"passed": [False]}, "did not pass"),
    ({"passed": 1}, "did not pass"),
    ({"passed": True, "thresholds": {"max_predicted_tre_mm": 2.0},
      "targets": [{"name": n, "predicted_tre_mm": 25.0} for n in "ABC"]}, "25.0 mm, over its 2 mm threshold"),
])
def test_robot_send_qa_gate_is_strict_and_refuses_before_connecting(tmp_path, qa, message):
    sim = Sim()
    try:
        r = _send(tmp_path, sim.port, {**PLAN, "registration_qa": qa}, "--confirm")
    finally:
        summary = sim.stop()
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert summary["robot_sim"]["commands"] == []


def test_robot_send_refuses_without_calibration_or_robot_frame_statement(tmp_path):
    sim = Sim()
    try:
        r = _send(tmp_path, sim.port, PLAN, "--confirm", "--no-frame")
    finally:
        summary = sim.stop()
    assert r.returncode == 2 and "There is no robot calibration" in r.stderr
    assert summary["robot_sim"]["commands"] == []


def test_robot_send_uses_the_calibration_file_and_logs_the_robot_frame(tmp_path):
    m = np.eye(4)
    m[:3, 3] = [5.0, -3.0, 2.0]
    cal = tmp_path / "robot_calibration.json"
    cal.write_text(json.dumps({"schema": "smartbiopsy.robot_calibration/1", "from_frame": "ROBOT", "to_frame": "CT",
                               "space": "RAS", "units": "mm", "matrix_robot_to_ct_ras": m.tolist(),
                               "qa": {"passed": True}, "source": "test fiducial frame"}))
    sim = Sim("--log", str(tmp_path / "sim.jsonl"))
    try:
        r = _send(tmp_path, sim.port, PLAN, "--confirm", "--calibration", str(cal), "--log", str(tmp_path / "s.jsonl"))
        bad = json.loads(cal.read_text())
        bad["qa"]["passed"] = "true"
        cal.write_text(json.dumps(bad))
        r_bad = _send(tmp_path, sim.port, PLAN, "--confirm", "--calibration", str(cal))
    finally:
        sim.stop()
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    frame = [x for x in records if x.get("event") == "robot_frame"]
    assert frame and frame[0]["frame"] == "calibrated" and frame[0]["source"] == "test fiducial frame"
    clb = [x for x in records if x["dir"] == "sent" and x["device"].startswith("CLB_")]
    np.testing.assert_allclose(clb[0]["matrix"], m, atol=1e-5)
    assert r_bad.returncode == 2 and "QA did not pass" in r_bad.stderr


def test_robot_send_states_robot_frame_ct_in_the_session_log(tmp_path):
    sim = Sim()
    try:
        r = _send(tmp_path, sim.port, PLAN, "--confirm", "--log", str(tmp_path / "s.jsonl"))
    finally:
        sim.stop()
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    frame = [x for x in records if x.get("event") == "robot_frame"]
    assert frame[0]["frame"] == "ct" and "stated explicitly" in frame[0]["statement"]


def test_robot_send_brp_profile_against_the_brp_simulator(tmp_path):
    sim = Sim("--profile", "brp")
    try:
        r = _send(tmp_path, sim.port, _planner_plan(), "--confirm", "--profile", "brp", "--log",
                  str(tmp_path / "s.jsonl"))
    finally:
        summary = sim.stop()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["profile"] == "brp" and [t["state"] for t in out["targets"]] == ["reached"] * 3
    assert summary["robot_sim"]["profile"] == "brp"
    sent = [json.loads(x)["device"] for x in (tmp_path / "s.jsonl").read_text().splitlines()
            if '"dir": "sent"' in x]
    assert "NEEDLE_LENGTH" in sent and sent.count("RETRACT_NEEDLE") == 2


def _wait_for_line(path, needle, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and needle in path.read_text():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_a_move_sends_stop_and_the_robot_stops(tmp_path, sig):
    sim_log = tmp_path / "sim.jsonl"
    sim = Sim("--speed", "5", "--log", str(sim_log))          # the first move takes about 9 s
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(PLAN))
    proc = subprocess.Popen(CLI + ["--quiet", "robot-send", "--port", str(sim.port), "--plan", str(p), "--confirm",
                                   "--robot-frame", "ct", "--log", str(tmp_path / "s.jsonl")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert _wait_for_line(sim_log, '"text": "MOVE_TO_TARGET"'), "the move never started"
        assert _wait_for_line(sim_log, '"device": "CURRENT_POSITION"'), "the robot never moved"
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        summary = sim.stop()
    assert proc.returncode == 130, err
    assert "STOP sent to the robot and acknowledged" in err
    assert summary["robot_sim"]["commands"][-1][1] == "STOP" and summary["robot_sim"]["moving"] is False
    records = [json.loads(x) for x in sim_log.read_text().splitlines()]
    stop_at = next(i for i, x in enumerate(records) if x["dir"] == "received" and x.get("text") == "STOP")
    after = [x for x in records[stop_at:] if x["dir"] == "sent" and x["device"] == "CURRENT_POSITION"]
    assert len(after) <= 1                                     # the robot stopped at the STOP


def test_robot_send_reads_the_registrations_qa_json(tmp_path):
    """qa.json as ``smartbiopsy register --target X,Y,Z`` writes it (targets T1..T3 at the planned points)."""
    qa = {"passed": True, "failures": [], "thresholds": {"max_predicted_tre_mm": 3.0},
          "targets": [{"name": f"T{i + 1}", "ras": t["target_ras"], "predicted_tre_mm": 1.4}
                      for i, t in enumerate(PLAN["trajectories"])]}
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    plan = {k: v for k, v in PLAN.items() if k != "registration_qa"}
    sim = Sim()
    try:
        ok = _send(tmp_path, sim.port, plan, "--confirm", "--registration-qa", str(tmp_path / "qa.json"))
        qa["targets"][1]["predicted_tre_mm"] = 3.5
        (tmp_path / "qa.json").write_text(json.dumps(qa))
        bad = _send(tmp_path, sim.port, plan, "--confirm", "--registration-qa", str(tmp_path / "qa.json"))
        missing = _send(tmp_path, sim.port, plan, "--confirm")
    finally:
        sim.stop()
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode == 2 and "target T2 is 3.5 mm, over its 3 mm threshold" in bad.stderr
    assert missing.returncode == 2 and "no registration QA" in missing.stderr

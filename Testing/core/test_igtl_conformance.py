"""Conformance: the sender against both simulator profiles (smartbiopsy, brp) and against fake robots that
misbehave in each way a real robot might (wrong echoes, stale statuses, malformed messages, bad geometry),
the fail-safe STOP, observers, and bounded per-id state. All over loopback."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from TrajectoryPlannerLib.errors import RobotBridgeError
from TrajectoryPlannerLib.robot import codec as C
from TrajectoryPlannerLib.robot.protocol import RobotPlan, RobotSession
from TrajectoryPlannerLib.robot.simulator import Fault, RobotSimulator
from TrajectoryPlannerLib.robot.transport import IgtlClient

QA = {"passed": True, "failures": [], "thresholds": {"max_predicted_tre_mm": 3.0},
      "targets": [{"name": n, "predicted_tre_mm": 1.2} for n in "ABC"]}
PLAN = {
    "trajectories": [
        {"name": "A", "region": "A", "entry_ras": [-30.0, 60.0, 90.0], "target_ras": [-10.0, 15.0, 40.0]},
        {"name": "B", "region": "B", "entry_ras": [0.0, 70.0, 95.0], "target_ras": [5.0, 20.0, 35.0]},
        {"name": "C", "region": "C", "entry_ras": [35.0, 65.0, 85.0], "target_ras": [20.0, 12.0, 45.0]},
    ],
    "registration_qa": QA,
}
FAST = dict(ack_timeout_s=1.0, status_timeout_s=2.0, motion_timeout_s=8.0, reconnect_delay_s=0.05,
            poll_period_s=0.01)
PROFILES = ("smartbiopsy", "brp")


def _sim(*faults, profile="smartbiopsy", **kw):
    kw.setdefault("speed_mm_s", 4000.0)
    return RobotSimulator(0, faults=list(faults), position_period_s=0.005, profile=profile, **kw).start()


def _session(sim, profile="smartbiopsy", plan=PLAN, **kw):
    s = RobotSession("127.0.0.1", sim.port, profile=profile, **{**FAST, **kw})
    s.connect()
    p = RobotPlan.from_dict(plan)
    p.needle_length_mm = 100.0
    s.load_plan(p)
    s.state_robot_frame_ct("Dr Test")
    s.confirm_plan("Dr Test")
    return s


def _run(sim, profile="smartbiopsy", **kw):
    s = _session(sim, profile, **kw)
    try:
        return s, s.run_plan(confirm=True)
    finally:
        s.close()


def _events(log):
    return [json.loads(x) for x in log.read_text().splitlines()]


# ------------------------------------------------------------------------------------ both profiles
@pytest.mark.parametrize("profile", PROFILES)
def test_full_session_completes_against_each_profile(tmp_path, profile):
    sim = _sim(profile=profile)
    log = tmp_path / "s.jsonl"
    try:
        s, result = _run(sim, profile, log_path=log)
    finally:
        sim.stop()
    assert result.completed and result.profile == profile and result.robot_frame == "ct"
    assert [t.state for t in result.targets] == ["reached"] * 3
    assert all(t.reached_error_mm < 1e-3 for t in result.targets)
    phases = [p for _, p in sim.commands]
    assert phases == ["START_UP", "CALIBRATION", "PLANNING"] + ["TARGETING", "MOVE_TO_TARGET"] * 3
    records = _events(log)
    assert records[0]["event"] == "session_started" and records[0]["profile"] == profile
    assert any(r.get("event") == "robot_frame" and r["frame"] == "ct" and "Dr Test" in r["statement"]
               for r in records)
    sent = [r["device"] for r in records if r["dir"] == "sent"]
    if profile == "brp":
        assert sim.needle_length_mm == 100.0 and "NEEDLE_LENGTH" in sent
        assert sent.count("RETRACT_NEEDLE") == 2                     # between targets, before each TARGETING
        assert "GET_TRANS" not in [r["type"] for r in records if r["dir"] == "sent"]
        states = [r["state"] for r in records if r.get("event") == "target_state" and r["target"] == "A"]
        assert states == ["reachable", "in_position", "reached"]     # MOVE_TO_TARGET OK = in position only
    else:
        assert "RETRACT_NEEDLE" not in sent


def test_brp_move_to_target_ok_is_not_taken_as_reached_while_the_needle_is_still_inserting(tmp_path):
    sim = _sim(profile="brp", speed_mm_s=400.0)        # 100 mm insertion takes 0.25 s
    log = tmp_path / "s.jsonl"
    try:
        s = _session(sim, "brp", log_path=log)
        s.command("START_UP")
        s.send_needle_length(100.0)
        s.calibrate()
        s.command("PLANNING")
        s.command("TARGETING", confirm=True)
        s.send_target("A", confirm=True)
        t = s.move_to_target("A", confirm=True)
        s.close()
    finally:
        sim.stop()
    assert t.state == "reached" and sim.has_reached_target and t.reached_error_mm < 1e-3
    queries = [r for r in _events(log) if r["dir"] == "received" and r["device"] == "HAS_REACHED_TARGET"]
    assert [q["text"] for q in queries][0] == "0" and queries[-1]["text"] == "1"


def test_brp_unreachable_target_is_followed_by_the_next_target_without_a_forbidden_transition():
    sim = _sim(Fault("unreachable", target=2), profile="brp")
    try:
        s, result = _run(sim, "brp")
    finally:
        sim.stop()
    assert [t.state for t in result.targets] == ["reached", "unreachable", "reached"]
    assert [p for _, p in sim.commands].count("TARGETING") == 2      # C is sent in the same TARGETING phase


def test_profile_mismatch_is_reported_not_ignored():
    sim = _sim(profile="smartbiopsy")
    try:
        s = _session(sim, "brp", status_timeout_s=0.5)
        with pytest.raises(RobotBridgeError, match="no CURRENT_STATUS status"):
            s.command("START_UP")
        s.close()
    finally:
        sim.stop()


# ------------------------------------------------------------------------------ misbehaving robots
@pytest.mark.parametrize("after", [0, 1])     # connection lost before the echo / after the echo, before STATUS
@pytest.mark.parametrize("profile", PROFILES)
def test_wrong_echo_of_a_target_resent_after_reconnect_is_caught(profile, after):
    sim = _sim(Fault("drop_connection", target=1, after=after),
               Fault("wrong_echo", target=1, offset_mm=5.0, resend=1), profile=profile)
    try:
        s = _session(sim, profile)
        with pytest.raises(RobotBridgeError, match=r"echoed target A 5\.00 mm"):
            s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    assert s.reconnects == 1 and s.target("A").state == "sent"
    assert "MOVE_TO_TARGET" not in [p for _, p in sim.commands]


@pytest.mark.parametrize("profile", PROFILES)
def test_rotated_echo_of_a_target_is_caught(profile):
    sim = _sim(Fault("wrong_echo", target=1, offset_mm=0.0, rotate_deg=3.0), profile=profile)
    try:
        s = _session(sim, profile)
        with pytest.raises(RobotBridgeError, match=r"echoed target A 0\.00 mm / 3\.00 deg"):
            s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    assert "MOVE_TO_TARGET" not in [p for _, p in sim.commands]


@pytest.mark.parametrize("fault, message", [
    ("wrong_echo:phase=CALIBRATION,offset_mm=2", r"echoed the calibration 2\.00 mm / 0\.00 deg"),
    ("wrong_echo:phase=CALIBRATION,offset_mm=0,rotate_deg=2", r"calibration 0\.00 mm / 2\.00 deg"),
])
@pytest.mark.parametrize("profile", PROFILES)
def test_wrong_calibration_echo_is_caught_and_nothing_is_targeted(profile, fault, message):
    sim = _sim(Fault.parse(fault), profile=profile)
    try:
        s = _session(sim, profile)
        with pytest.raises(RobotBridgeError, match=message):
            s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    assert "TARGETING" not in [p for _, p in sim.commands]


@pytest.mark.parametrize("profile", PROFILES)
def test_reachable_target_that_differs_from_the_target_sent_is_caught(profile):
    sim = _sim(Fault("wrong_reachable", target=1, offset_mm=5.0), profile=profile)
    try:
        s = _session(sim, profile)
        with pytest.raises(RobotBridgeError, match=r"reports target A reachable but its REACHABLE_TARGET is 5\.00 mm"):
            s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    assert "MOVE_TO_TARGET" not in [p for _, p in sim.commands]


@pytest.mark.parametrize("profile", PROFILES)
def test_stale_calibration_ok_is_not_taken_for_the_answer_to_the_calibration(profile):
    sim = _sim(Fault("stale_status", phase="CALIBRATION"), profile=profile)
    try:
        s = _session(sim, profile)
        with pytest.raises(RobotBridgeError, match="refused the calibration"):
            s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    assert "TARGETING" not in [p for _, p in sim.commands] and sim.targets == {}


@pytest.mark.parametrize("profile", PROFILES)
def test_echo_with_an_all_zero_rotation_is_refused(profile):
    sim = _sim(Fault("bad_rotation", target=1), profile=profile)
    try:
        s = _session(sim, profile)
        with pytest.raises(RobotBridgeError, match="not orthonormal"):
            s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    assert "MOVE_TO_TARGET" not in [p for _, p in sim.commands]


@pytest.mark.parametrize("profile", PROFILES)
def test_malformed_v2_message_from_the_robot_is_dropped_and_the_session_completes(profile):
    sim = _sim(Fault("malformed", phase="START_UP"), Fault("malformed", target=2), profile=profile)
    try:
        s, result = _run(sim, profile)
    finally:
        sim.stop()
    assert result.completed
    assert [r.reason for r in s.client.rejections] == ["malformed_body", "malformed_body"]
    assert "metadata header" in s.client.rejections[0].detail


def test_stop_that_is_never_acknowledged_returns_false_within_its_timeout():
    sim = _sim(Fault("missing_ack", phase="STOP", count=-1))
    try:
        s = _session(sim)
        s.motion_possible = True
        t0 = time.monotonic()
        assert s.emergency_stop(0.5) is False
        assert time.monotonic() - t0 < 5.0
        s.close(stop_if_moving=False)
    finally:
        sim.stop()


# ---------------------------------------------------------------------------------- robot side
def _raw_client(sim):
    cl = IgtlClient("127.0.0.1", sim.port)
    cl.connect()
    return cl


def _ok(cl, msg, match):
    cl.send(msg)
    return cl.receive(match, timeout=3)


def test_simulator_refuses_non_rigid_calibration_and_target_rotations():
    sim = _sim()
    try:
        cl = _raw_client(sim)
        _ok(cl, C.StringMessage("CMD_1", "START_UP"), ("STATUS", "START_UP"))
        _ok(cl, C.StringMessage("CMD_2", "CALIBRATION"), ("STRING", "ACK_2"))
        sheared = np.eye(4)
        sheared[0, 1] = 0.3
        st = _ok(cl, C.TransformMessage("CLB_3", sheared), ("STATUS", "CALIBRATION"))
        assert st.code == C.StatusCode.CONFIG_ERROR and "not orthonormal" in st.status_string
        scaled = np.eye(4) * 1000.0
        scaled[3, 3] = 1.0
        st = _ok(cl, C.TransformMessage("CLB_4", scaled), ("STATUS", "CALIBRATION"))
        assert st.code == C.StatusCode.CONFIG_ERROR and sim.calibration is None
        st = _ok(cl, C.TransformMessage("CLB_5", np.eye(4)), ("STATUS", "CALIBRATION"))
        assert st.ok
        _ok(cl, C.StringMessage("CMD_6", "TARGETING"), ("STATUS", "TARGETING"))
        for i, rot in enumerate((np.zeros((3, 3)), np.diag([1.0, 1.0, 2.0]))):
            bad = np.eye(4)
            bad[:3, :3] = rot
            bad[:3, 3] = [1, 2, 3]
            st = _ok(cl, C.TransformMessage(f"TGT_{7 + i}", bad), ("STATUS", "TARGET"))
            assert st.code == C.StatusCode.CONFIG_ERROR and st.subcode == 1 and "not orthonormal" in st.status_string
        st = _ok(cl, C.StringMessage("CMD_9", "MOVE_TO_TARGET"), ("STATUS", "MOVE_TO_TARGET"))
        assert not st.ok and not sim.moving
        cl.close()
    finally:
        sim.stop()


def test_simulator_per_id_state_is_bounded():
    sim = _sim()
    try:
        cl = _raw_client(sim)
        n = 600
        for i in range(n):
            cl.send(C.StringMessage(f"CMD_{i:05d}", "START_UP"))
        assert cl.receive(("STRING", f"ACK_{n - 1:05d}"), timeout=20) is not None
        cl.close()
    finally:
        sim.stop()
    assert len(sim.replies) <= sim.max_ids < n
    assert len(sim.commands) <= 10 * sim.max_ids


# -------------------------------------------------------------------------------------- observers
@pytest.mark.parametrize("profile", PROFILES)
def test_observer_sees_targets_statuses_and_position_under_fixed_names(profile):
    sim = _sim(profile=profile)
    seen = []
    try:
        obs = IgtlClient("127.0.0.1", sim.port, on_message=lambda conn, m: seen.append(m))
        obs.connect()
        s, result = _run(sim, profile)
        time.sleep(0.2)
        obs.close()
    finally:
        sim.stop()
    assert result.completed
    names = {(m.type_name, m.device_name) for m in seen}
    assert {("TRANSFORM", "TARGET"), ("TRANSFORM", "REACHABLE_TARGET"), ("TRANSFORM", "CURRENT_POSITION"),
            ("STATUS", "TARGET"), ("STATUS", "TARGETING"), ("TRANSFORM", "CALIBRATION")} <= names
    assert not any(m.device_name.startswith(("ACK_", "CMD_", "TGT_", "CLB_")) for m in seen)
    targets = [m.matrix[:3, 3] for m in seen if m.type_name == "TRANSFORM" and m.device_name == "TARGET"]
    np.testing.assert_allclose(targets, [t["target_ras"] for t in PLAN["trajectories"]], atol=1e-4)


# -------------------------------------------------------------------------------------- fail-safe
@pytest.mark.parametrize("profile", PROFILES)
def test_emergency_stop_during_motion_halts_the_robot_and_is_acknowledged(tmp_path, profile):
    sim = _sim(profile=profile, speed_mm_s=20.0)               # a move takes seconds
    log = tmp_path / "s.jsonl"
    errors = []
    try:
        s = _session(sim, profile, log_path=log, motion_timeout_s=30.0)

        def run():
            try:
                s.run_plan(confirm=True)
            except RobotBridgeError as exc:
                errors.append(exc)

        th = threading.Thread(target=run, daemon=True)
        th.start()
        end = time.monotonic() + 10
        while not sim.moving and time.monotonic() < end:
            time.sleep(0.01)
        assert sim.moving and s.motion_possible
        assert s.emergency_stop(2.0) is True
        assert not sim.moving and sim.phase == "STOP" and not s.motion_possible
        th.join(15)
        s.close()
    finally:
        sim.stop()
    assert not th.is_alive() and errors        # the session ends with an error, not a silent success
    events = [r.get("event") for r in _events(log)]
    assert "emergency_stop" in events and "emergency_stop_acknowledged" in events


def test_close_sends_stop_when_motion_may_be_in_progress():
    sim = _sim(speed_mm_s=20.0)
    try:
        s = _session(sim)
        s.command("START_UP")
        s.calibrate()
        s.command("PLANNING")
        s.command("TARGETING", confirm=True)
        s.send_target("A", confirm=True)
        s.client.send(C.StringMessage(f"CMD_{s._new_id()}", "MOVE_TO_TARGET"))   # as if interrupted mid-move
        end = time.monotonic() + 5
        while not sim.moving and time.monotonic() < end:
            time.sleep(0.01)
        assert sim.moving and s.motion_possible
        s.close()
        time.sleep(0.1)
    finally:
        sim.stop()
    assert not sim.moving and [p for _, p in sim.commands][-1] == "STOP"


def test_targeting_refused_without_calibration_or_explicit_robot_frame():
    sim = _sim()
    try:
        s = RobotSession("127.0.0.1", sim.port, **FAST)
        s.connect()
        s.load_plan(RobotPlan.from_dict(PLAN))
        s.confirm_plan("Dr Test")
        with pytest.raises(RobotBridgeError, match="no robot calibration"):
            s.run_plan(confirm=True)
        with pytest.raises(RobotBridgeError, match="no robot calibration"):
            s.calibrate()
        s.close()
    finally:
        sim.stop()
    assert sim.commands == [] and sim.calibration is None


def test_sender_workspace_limit_refuses_a_target_before_sending_it():
    sim = _sim()
    try:
        s = _session(sim, workspace_mm=((-50, -50, -50), (50, 50, 42)))     # C is at z = 45 mm
        s.command("START_UP")
        s.calibrate()
        s.command("TARGETING", confirm=True)
        assert s.send_target("A", confirm=True).state == "reachable"
        with pytest.raises(RobotBridgeError, match=r"Target C is 3\.0 mm outside the robot workspace; it is not sent"):
            s.send_target("C", confirm=True)
        s.close(stop_if_moving=False)
    finally:
        sim.stop()
    assert s.target("C").state == "unreachable" and len(sim.targets) == 1


def test_brp_needle_position_from_the_confirmation_image_is_echoed_and_checked():
    sim = _sim(profile="brp")
    try:
        s = _session(sim, "brp")
        s.command("START_UP")
        s.send_needle_length(100.0)
        s.calibrate()
        s.command("PLANNING")
        s.command("TARGETING", confirm=True)
        s.send_target("A", confirm=True)
        s.move_to_target("A", confirm=True)
        seen = s.target("A").pose()
        seen[:3, 3] += [0.4, -0.3, 0.2]
        assert s.send_needle_position(seen) < 1e-3
        s.retract_needle()
        s.close()
    finally:
        sim.stop()
    assert sim.needle_home

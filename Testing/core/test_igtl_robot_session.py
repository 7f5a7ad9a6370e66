"""Robot session against the simulator over loopback: full session, every injected fault, safety, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from TrajectoryPlannerLib.errors import RobotBridgeError
from TrajectoryPlannerLib.robot.protocol import RobotPlan, RobotSession, needle_pose, pose_difference
from TrajectoryPlannerLib.robot.simulator import Fault, RobotSimulator, Workspace

PLAN = {
    "trajectories": [
        {"name": "A", "region": "A", "entry_ras": [-30.0, 60.0, 90.0], "target_ras": [-10.0, 15.0, 40.0]},
        {"name": "B", "region": "B", "entry_ras": [0.0, 70.0, 95.0], "target_ras": [5.0, 20.0, 35.0]},
        {"name": "C", "region": "C", "entry_ras": [35.0, 65.0, 85.0], "target_ras": [20.0, 12.0, 45.0]},
    ],
    "registration_qa": {"passed": True, "failures": [], "thresholds": {"max_predicted_tre_mm": 3.0},
                        "targets": [{"name": n, "predicted_tre_mm": 1.2} for n in "ABC"]},
}
FAST = dict(ack_timeout_s=1.0, status_timeout_s=2.0, motion_timeout_s=5.0, reconnect_delay_s=0.05)


def _session(sim, plan=PLAN, confirm=True, frame="ct", **kw):
    opts = {**FAST, **kw}
    s = RobotSession("127.0.0.1", sim.port, **opts)
    s.connect()
    s.load_plan(RobotPlan.from_dict(plan))
    if frame == "ct":
        s.state_robot_frame_ct("Dr Test")
    if confirm:
        s.confirm_plan("Dr Test")
    return s


def _sim(*faults, **kw):
    return RobotSimulator(0, faults=list(faults), speed_mm_s=2000.0, position_period_s=0.005, **kw).start()


def _robot_targets(sim):
    """Target points (RAS) the robot acted on, in arrival order."""
    return [t.pose_ras[:3, 3] for t in sorted(sim.targets.values(), key=lambda t: t.ordinal)]


@pytest.mark.parametrize("header_version", [1, 2])
def test_full_three_target_session(tmp_path, header_version):
    sim = _sim(log_path=tmp_path / "robot.jsonl")
    log = tmp_path / "session.jsonl"
    try:
        s = _session(sim, log_path=log, header_version=header_version)
        result = s.run_plan(confirm=True)
        for name in "ABC":
            s.mark_sampled(name) if name != "C" else None
        s.close()
    finally:
        sim.stop()
    assert result.completed
    states = {t.name: t.state for t in result.targets}
    assert states == {"A": "sampled", "B": "sampled", "C": "reached"}
    # the robot received each planned target exactly once, with the planned point and needle direction
    got = _robot_targets(sim)
    assert len(got) == 3 and all(t.receipts == 1 for t in sim.targets.values())
    for t_plan, robot_pose in zip(PLAN["trajectories"], sorted(sim.targets.values(), key=lambda t: t.ordinal)):
        dist, ang = pose_difference(needle_pose(t_plan["entry_ras"], t_plan["target_ras"]), robot_pose.pose_ras)
        assert dist < 1e-3 and ang < 1e-3
    for t in result.targets:
        assert t.echo_error_mm < 1e-3 and t.reached_error_mm < 1e-3
    assert [p for _, p in sim.commands] == ["START_UP", "CALIBRATION", "PLANNING"] + ["TARGETING", "MOVE_TO_TARGET"] * 3
    # the session log holds every message sent and received
    records = [json.loads(line) for line in log.read_text().splitlines()]
    sent = [r for r in records if r["dir"] == "sent"]
    received = [r for r in records if r["dir"] == "received"]
    assert sum(1 for r in sent if r["device"].startswith("TGT_")) == 3
    assert any(r["type"] == "STATUS" and r["device"] == "TARGET" for r in received)
    assert len(sent) == s.client.connection.messages_sent
    assert len(received) == s.client.connection.messages_received
    if header_version == 2:
        tgt = [r for r in sent if r["device"].startswith("TGT_")]
        assert [r["metadata"]["target_name"] for r in tgt] == ["A", "B", "C"]


def test_dropped_connection_resumes_without_losing_or_duplicating_a_target():
    sim = _sim(Fault("drop_connection", target=2))
    try:
        s = _session(sim)
        result = s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    assert result.completed and s.reconnects == 1
    assert sim.connections_seen == 2
    assert len(sim.targets) == 3                                     # none lost, none added
    tb = s.target("B")
    assert tb.transmissions == 2 and sim.duplicates == {f"TGT_{tb.target_id}": 1}  # re-sent with the same id
    assert [p for _, p in sim.commands].count("MOVE_TO_TARGET") == 3


def test_drop_during_motion_resumes_and_waits_for_the_move():
    sim = _sim(Fault("drop_connection", phase="MOVE_TO_TARGET"))
    try:
        s = _session(sim)
        result = s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    assert result.completed and s.reconnects >= 1
    assert [p for _, p in sim.commands].count("MOVE_TO_TARGET") == 3


def test_short_ack_delay_needs_no_retry():
    sim = _sim(Fault("delay_ack", phase="START_UP", delay_s=0.1))
    try:
        s = _session(sim, ack_timeout_s=2.0)
        s.command("START_UP")
        s.close()
    finally:
        sim.stop()
    assert sim.duplicates == {}


def test_ack_later_than_timeout_is_retried_and_acted_on_once():
    sim = _sim(Fault("delay_ack", phase="START_UP", delay_s=0.5))
    try:
        s = _session(sim, ack_timeout_s=0.2)
        st = s.command("START_UP")
        s.close()
    finally:
        sim.stop()
    assert st.ok
    assert sum(1 for _, p in sim.commands if p == "START_UP") == 1
    assert sum(sim.duplicates.values()) >= 1


def test_missing_ack_once_is_retried():
    sim = _sim(Fault("missing_ack", phase="START_UP"))
    try:
        s = _session(sim, ack_timeout_s=0.3)
        assert s.command("START_UP").ok
        s.close()
    finally:
        sim.stop()
    assert [p for _, p in sim.commands] == ["START_UP"]


def test_missing_ack_always_fails_after_bounded_retries(tmp_path):
    sim = _sim(Fault("missing_ack", phase="START_UP", count=-1))
    log = tmp_path / "s.jsonl"
    try:
        s = _session(sim, retries=2, log_path=log, ack_timeout_s=0.3)
        with pytest.raises(RobotBridgeError, match="did not acknowledge START_UP .* after 3 attempts"):
            s.command("START_UP")
        s.close()
    finally:
        sim.stop()
    sent = [json.loads(x) for x in log.read_text().splitlines()]
    assert sum(1 for r in sent if r["dir"] == "sent" and r.get("text") == "START_UP") == 3
    assert sim.commands == []


def test_refused_transition_reaches_the_user_with_the_robot_text():
    sim = _sim(Fault("refuse", phase="MOVE_TO_TARGET", code=13))
    try:
        s = _session(sim)
        with pytest.raises(RobotBridgeError, match="refused MOVE_TO_TARGET: MOVE_TO_TARGET refused by the robot "
                                                    r"\(simulated refusal\) \(NOT_READY\)"):
            s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    assert s.target("A").state == "reachable"   # not marked reached


def test_wrong_echo_is_caught_and_nothing_moves():
    sim = _sim(Fault("wrong_echo", target=1, offset_mm=3.0))
    try:
        s = _session(sim, tolerance_mm=0.5)
        with pytest.raises(RobotBridgeError, match=r"echoed target A 3\.00 mm"):
            s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    ta = s.target("A")
    assert ta.state == "sent" and ta.echo_error_mm == pytest.approx(3.0, abs=1e-3)
    assert "MOVE_TO_TARGET" not in [p for _, p in sim.commands]


def test_echo_within_tolerance_is_accepted_and_measured():
    sim = _sim(Fault("wrong_echo", target=1, offset_mm=0.2))
    try:
        s = _session(sim, tolerance_mm=0.5)
        s.command("START_UP")
        s.calibrate()
        s.command("TARGETING", confirm=True)
        t = s.send_target("A", confirm=True)
        s.close()
    finally:
        sim.stop()
    assert t.state == "reachable" and t.echo_error_mm == pytest.approx(0.2, abs=1e-3)


def test_unreachable_target_reported_with_robot_text_and_never_moved_to():
    sim = _sim(Fault("unreachable", target=3))
    try:
        s = _session(sim)
        result = s.run_plan(confirm=True)
        with pytest.raises(RobotBridgeError, match="unreachable"):
            s.move_to_target("C", confirm=True)
        s.close()
    finally:
        sim.stop()
    assert not result.completed
    tc = s.target("C")
    assert tc.state == "unreachable" and "target 3 unreachable" in tc.robot_status
    assert tc.reachable_ras is not None and np.linalg.norm(np.subtract(tc.reachable_ras, tc.target_ras)) > 1
    assert [p for _, p in sim.commands].count("MOVE_TO_TARGET") == 2


def test_workspace_limit_makes_a_target_unreachable():
    sim = _sim(workspace=Workspace(lower_mm=(-50, -50, -50), upper_mm=(50, 50, 42)))
    try:
        s = _session(sim)
        result = s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    states = {t.name: t.state for t in result.targets}
    assert states == {"A": "reached", "B": "reached", "C": "unreachable"}   # C is at z = 45 mm > 42 mm
    assert "outside the robot workspace" in s.target("C").robot_status


def test_motion_refused_without_confirmation_qa_or_operator_and_nothing_is_sent():
    failed_qa = {**PLAN, "registration_qa": {"passed": False}}
    sim = _sim()
    try:
        s = _session(sim)
        s.command("START_UP")
        with pytest.raises(RobotBridgeError, match="explicit confirmation"):
            s.command("TARGETING")
        with pytest.raises(RobotBridgeError, match="explicit confirmation"):
            s.send_target("A")
        with pytest.raises(RobotBridgeError, match="explicit confirmation"):
            s.run_plan()
        s.close()
        s2 = _session(sim, confirm=False)
        with pytest.raises(RobotBridgeError, match="operator has not confirmed"):
            s2.command("MOVE_TO_TARGET", confirm=True)
        s2.close()
        s3 = _session(sim, plan=failed_qa)
        with pytest.raises(RobotBridgeError, match="registration QA has not passed"):
            s3.run_plan(confirm=True)
        with pytest.raises(RobotBridgeError, match="registration QA has not passed"):
            s3.send_target("B", confirm=True)
        # STOP and EMERGENCY are always allowed
        assert s3.stop().ok and s3.emergency().ok
        s3.close()
    finally:
        sim.stop()
    assert [p for _, p in sim.commands] == ["START_UP", "STOP", "EMERGENCY"]
    assert sim.targets == {}


def test_emergency_latches_until_start_up():
    sim = _sim()
    try:
        s = _session(sim)
        s.command("START_UP")
        s.emergency()
        with pytest.raises(RobotBridgeError, match="EMERGENCY; send START_UP first"):
            s.command("PLANNING")
        assert s.command("START_UP").ok
        s.close()
    finally:
        sim.stop()


def test_new_session_resumes_from_state_file_without_resending(tmp_path):
    state = tmp_path / "state.json"
    sim = _sim()
    try:
        s1 = _session(sim, state_path=state)
        calls = {"n": 0}

        def cancel_after_first():
            calls["n"] += 1
            return calls["n"] > 1

        r1 = s1.run_plan(confirm=True, should_cancel=cancel_after_first)
        s1.close()   # e.g. the workstation restarts
        assert r1.cancelled and [t.state for t in r1.targets] == ["reached", "planned", "planned"]
        s2 = _session(sim, state_path=state)
        assert s2.target("A").state == "reached" and s2.tag == s1.tag
        r2 = s2.run_plan(confirm=True)
        s2.close()
    finally:
        sim.stop()
    assert r2.completed
    assert len(sim.targets) == 3 and all(t.receipts == 1 for t in sim.targets.values())
    assert len({cid for cid, _ in sim.commands}) == len(sim.commands)  # no id reused for a new command


def test_current_position_polling_tracks_the_needle():
    sim = RobotSimulator(0, speed_mm_s=500.0, position_period_s=0.01, home_ras=(1.0, 2.0, 3.0)).start()
    try:
        s = _session(sim)
        np.testing.assert_allclose(s.current_position()[:3, 3], [1, 2, 3], atol=1e-5)
        s.run_plan(confirm=True)
        np.testing.assert_allclose(s.current_position()[:3, 3], PLAN["trajectories"][2]["target_ras"], atol=1e-4)
        s.close()
    finally:
        sim.stop()


@pytest.mark.parametrize("bad, message", [
    ({"trajectories": []}, "1 to 3"),
    ({"trajectories": [{**PLAN["trajectories"][0], "name": n} for n in "ABCD"]}, "1 to 3"),
    ({"trajectories": [{"name": "A", "entry_ras": [0, 0, 0]}]}, "entry_ras"),
    ({"trajectories": [{"name": "A", "entry_ras": [1, 2, 3], "target_ras": [1, 2, 3]}]}, "same entry and target"),
    ({"trajectories": [{"name": "A", "entry_ras": [1, 2], "target_ras": [1, 2, 3]}]}, "three finite"),
    ({"trajectories": [PLAN["trajectories"][0], PLAN["trajectories"][0]]}, "unique name"),
    ({"plan": 1}, "trajectories"),
])
def test_bad_plans_are_rejected_with_a_clear_message(bad, message):
    with pytest.raises(RobotBridgeError, match=message):
        RobotPlan.from_dict(bad)


def test_fault_spec_parsing():
    f = Fault.parse("delay_ack:phase=start_up,delay=0.25,count=2")
    assert (f.kind, f.phase, f.delay_s, f.count) == ("delay_ack", "START_UP", 0.25, 2)
    with pytest.raises(RobotBridgeError, match="Unknown fault"):
        Fault.parse("explode")
    with pytest.raises(RobotBridgeError, match="key=value"):
        Fault.parse("refuse:TARGETING")


def test_simulator_rejects_bad_messages_mid_session_and_the_session_continues(tmp_path):
    from TrajectoryPlannerLib.robot import codec as C
    sim = _sim()
    log = tmp_path / "s.jsonl"
    try:
        s = _session(sim, log_path=log)
        s.command("START_UP")
        bad = bytearray(C.TransformMessage("TGT_bad", np.eye(4)).pack())
        bad[-2] ^= 0xFF
        s.client.send_bytes(bytes(bad))                                   # wrong CRC
        s.client.send_bytes(C.StringMessage("CMD_big", "x" * 60000).pack()[:40])   # truncated header...
        s.client.send_bytes(b"\0" * 18 + b"garbage" * 5)                  # ...then garbage
        result = s.run_plan(confirm=True)
        s.close()
    finally:
        sim.stop()
    assert result.completed
    reasons = {r.reason for r in sim.rejections}
    assert {"crc_mismatch", "malformed_header"} <= reasons
    assert any("TGT_bad" in st.status_string for st in s.rejections_reported)
    assert not any(t.target_id == "bad" for t in sim.targets.values())


def test_session_client_survives_malformed_input_from_the_robot(tmp_path):
    import socket
    import threading

    from TrajectoryPlannerLib.robot import codec as C
    from TrajectoryPlannerLib.robot.transport import IgtlClient

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)

    def robot():
        conn, _ = lsock.accept()
        bad = bytearray(C.StatusMessage("TARGET", status_string="x").pack())
        bad[-1] ^= 1
        conn.sendall(bytes(bad) + b"\x00\x09noise" + C.StringMessage("ACK_1", "START_UP").pack())
        conn.recv(10)
        conn.close()

    th = threading.Thread(target=robot, daemon=True)
    th.start()
    with IgtlClient("127.0.0.1", lsock.getsockname()[1]) as cl:
        cl.connect()
        ack = cl.receive(("STRING", "ACK_1"), timeout=3)
        assert ack is not None and ack.text == "START_UP"
        assert [r.reason for r in cl.rejections][:2] == ["crc_mismatch", "malformed_header"]
    th.join(3)
    lsock.close()

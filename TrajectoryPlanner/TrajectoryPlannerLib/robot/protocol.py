"""Robot session over OpenIGTLink: the workphase protocol of open MRI/CT needle-guidance robots.

Protocol (navigation = this client, robot = server), as in the ProstateNav/BRP robot bridges:

* ``CMD_<id>`` STRING whose text is a phase (START_UP, CALIBRATION, PLANNING, TARGETING,
  MOVE_TO_TARGET, MANUAL, STOP, EMERGENCY) -> robot answers ``ACK_<id>`` STRING (same text), then a
  STATUS named after the phase when the phase is entered (MOVE_TO_TARGET: when the target is reached).
  A STATUS code other than OK is a refusal; its text is shown to the user.
* ``CLB_<id>`` TRANSFORM (robot base -> RAS, mm) during CALIBRATION -> echo ``ACK_<id>`` TRANSFORM and
  STATUS CALIBRATION.
* ``TGT_<id>`` TRANSFORM during TARGETING: translation = target point (RAS, mm), third rotation column =
  needle direction (unit vector entry -> target, RAS) -> echo ``ACK_<id>`` TRANSFORM, STATUS TARGET
  (OK, or CONFIG_ERROR with subcode 3 when unreachable) and TRANSFORM ``REACHABLE_TARGET``.
* ``GET_TRANS`` query ``CURRENT_POSITION`` -> TRANSFORM ``CURRENT_POSITION`` (also pushed during motion).

Ids are ``<4 hex session tag><4 digit counter>``; a message re-sent after a timeout or a reconnect keeps
its id so the robot recognises it and does not act twice. Every acknowledgement has a timeout and a
bounded number of attempts; a dropped connection is re-established (bounded) and the pending message
re-sent with the same id. The echoed transform is compared with the pose this session computed and
kept before sending (never with a re-decoded copy of itself) within ``tolerance_mm`` / ``tolerance_deg``.

Safety: TARGETING, sending a target and MOVE_TO_TARGET need (1) the operator's plan confirmation,
(2) a passed registration QA and (3) ``confirm=True`` in the same call. STOP and EMERGENCY are always
sent. Every message sent and received is written to the session log (JSON Lines) when a path is given;
the session state (ids, per-target state) can be kept in a JSON file so a new session resumes.

Plan file (``plan.json``) accepted by :meth:`RobotPlan.load`::

    {"trajectories": [{"name": "A", "region": "A", "entry_ras": [x, y, z], "target_ras": [x, y, z], ...}],
     "registration_qa": {"passed": true, ...},
     "calibration_matrix": [[4x4]]}          # optional: robot base -> RAS, mm; identity if absent

One to three trajectories; coordinates in RAS mm; extra keys are ignored.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from TrajectoryPlannerLib.errors import RobotBridgeError
from TrajectoryPlannerLib.robot.codec import StatusCode, StatusMessage, StringMessage, TransformMessage, query_message
from TrajectoryPlannerLib.robot.transport import IgtlClient, Inbox

logger = logging.getLogger(__name__)

PHASES = ("START_UP", "CALIBRATION", "PLANNING", "TARGETING", "MOVE_TO_TARGET", "MANUAL", "STOP", "EMERGENCY")
MOTION_PHASES = frozenset({"TARGETING", "MOVE_TO_TARGET"})
ALWAYS_ALLOWED = frozenset({"STOP", "EMERGENCY"})
TARGET_STATES = ("planned", "sent", "reachable", "unreachable", "reached", "sampled")
MAX_TARGETS = 3
UNREACHABLE_SUBCODE = 3


# ----------------------------------------------------------------------------------------- geometry
def needle_pose(entry_ras, target_ras) -> np.ndarray:
    """4x4 pose (RAS, mm): translation = target, third column = unit needle direction entry -> target."""
    entry = np.asarray(entry_ras, float).reshape(3)
    target = np.asarray(target_ras, float).reshape(3)
    d = target - entry
    n = np.linalg.norm(d)
    if not np.isfinite(n) or n < 1e-6:
        raise RobotBridgeError("A trajectory has the same entry and target point; re-plan it before sending.")
    z = d / n
    ref = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(ref, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, z, target
    return m


def pose_difference(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """(translation distance in mm, rotation angle in degrees) between two 4x4 poses."""
    e = np.asarray(expected, float)
    a = np.asarray(actual, float)
    dist = float(np.linalg.norm(e[:3, 3] - a[:3, 3]))
    r = e[:3, :3].T @ a[:3, :3]
    v = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    angle = np.arctan2(np.linalg.norm(v) / 2.0, (np.trace(r) - 1.0) / 2.0)  # stable for small angles
    return dist, float(np.degrees(abs(angle)))


# -------------------------------------------------------------------------------------------- plan
@dataclass
class RobotTarget:
    """One biopsy target and its state in the robot session (RAS, mm)."""

    name: str
    region: str
    entry_ras: list
    target_ras: list
    state: str = "planned"
    target_id: str = ""
    transmissions: int = 0
    echo_error_mm: float | None = None
    echo_error_deg: float | None = None
    reachable_ras: list | None = None
    robot_status: str = ""
    reached_error_mm: float | None = None

    def pose(self) -> np.ndarray:
        return needle_pose(self.entry_ras, self.target_ras)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "region", "entry_ras", "target_ras", "state", "target_id",
                                               "transmissions", "echo_error_mm", "echo_error_deg", "reachable_ras",
                                               "robot_status", "reached_error_mm")}


@dataclass
class RobotPlan:
    """What is sent to the robot: up to three targets, registration QA verdict, robot calibration."""

    targets: list
    registration_qa_passed: bool
    registration_qa: dict = field(default_factory=dict)
    calibration_matrix: np.ndarray = field(default_factory=lambda: np.eye(4))

    @classmethod
    def from_dict(cls, data: dict) -> "RobotPlan":
        if not isinstance(data, dict) or not isinstance(data.get("trajectories"), list):
            raise RobotBridgeError("The plan has no 'trajectories' list; export the plan from the planner again.")
        trajs = data["trajectories"]
        if not 1 <= len(trajs) <= MAX_TARGETS:
            raise RobotBridgeError(f"The plan has {len(trajs)} trajectories; a robot session takes 1 to "
                                   f"{MAX_TARGETS}.")
        targets, names = [], set()
        for i, t in enumerate(trajs):
            try:
                name = str(t.get("name") or f"T{i + 1}")
                entry = [float(v) for v in t["entry_ras"]]
                target = [float(v) for v in t["target_ras"]]
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise RobotBridgeError(f"Trajectory {i + 1} of the plan lacks numeric 'entry_ras'/'target_ras' "
                                       "(RAS, mm); export the plan again.") from exc
            if len(entry) != 3 or len(target) != 3 or not np.all(np.isfinite(entry + target)):
                raise RobotBridgeError(f"Trajectory {name} needs three finite RAS coordinates (mm) for entry and "
                                       "target; export the plan again.")
            if name in names:
                raise RobotBridgeError(f"Two trajectories are named {name}; give each a unique name.")
            names.add(name)
            needle_pose(entry, target)  # validates entry != target
            targets.append(RobotTarget(name, str(t.get("region", name)), entry, target))
        qa = data.get("registration_qa") or {}
        calib = np.asarray(data.get("calibration_matrix", np.eye(4)), float)
        if calib.shape != (4, 4) or not np.all(np.isfinite(calib)):
            raise RobotBridgeError("The plan's 'calibration_matrix' must be a finite 4x4 matrix (robot -> RAS, mm).")
        return cls(targets, bool(qa.get("passed", False)) if isinstance(qa, dict) else False,
                   qa if isinstance(qa, dict) else {}, calib)

    @classmethod
    def load(cls, path) -> "RobotPlan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise RobotBridgeError(f"Plan file {path} does not exist; check the path.") from exc
        except (OSError, ValueError) as exc:
            raise RobotBridgeError(f"Plan file {path} is not readable JSON ({exc}); export the plan again.") from exc
        return cls.from_dict(data)


# ----------------------------------------------------------------------------------------- logging
class SessionLog:
    """JSON Lines log: one record per message sent/received and per session event; thread-safe."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, direction: str, **record):
        rec = {"time": time.time(), "dir": direction, **record}
        line = json.dumps(rec, default=_json_default)
        with self._lock:
            if not self._fh.closed:
                self._fh.write(line + "\n")
                self._fh.flush()

    def message(self, direction: str, message):
        self.write(direction, **message.to_dict())

    def close(self):
        with self._lock:
            self._fh.close()


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


# ----------------------------------------------------------------------------------------- session
@dataclass
class SessionResult:
    targets: list
    completed: bool
    cancelled: bool = False
    log_path: str = ""

    def to_dict(self) -> dict:
        return {"targets": [t.to_dict() for t in self.targets], "completed": self.completed,
                "cancelled": self.cancelled, "log_path": self.log_path}


class RobotSession:
    """Client side of the robot protocol (used by the Slicer module and ``smartbiopsy robot-send``).

    Timeouts in seconds, tolerances in mm and degrees. ``retries`` extra attempts per acknowledgement;
    ``reconnect_attempts`` per lost connection. ``state_path`` (optional JSON) keeps ids and target states
    so a later session resumes without losing or re-sending a target.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 18944, *, log_path=None, state_path=None,
                 ack_timeout_s: float = 1.0, status_timeout_s: float = 5.0, motion_timeout_s: float = 120.0,
                 retries: int = 2, reconnect_attempts: int = 3, reconnect_delay_s: float = 0.2,
                 tolerance_mm: float = 0.5, tolerance_deg: float = 0.5, header_version: int = 1):
        if tolerance_mm <= 0 or tolerance_deg <= 0:
            raise RobotBridgeError("Echo tolerances must be positive (mm and degrees).")
        self.ack_timeout_s = float(ack_timeout_s)
        self.status_timeout_s = float(status_timeout_s)
        self.motion_timeout_s = float(motion_timeout_s)
        self.retries = max(0, int(retries))
        self.reconnect_attempts = max(0, int(reconnect_attempts))
        self.reconnect_delay_s = float(reconnect_delay_s)
        self.tolerance_mm = float(tolerance_mm)
        self.tolerance_deg = float(tolerance_deg)
        self.header_version = header_version
        self.log = SessionLog(log_path) if log_path else None
        self.state_path = Path(state_path) if state_path else None
        self.tag = secrets.token_hex(2)
        self.counter = 0
        self.plan: RobotPlan | None = None
        self.plan_confirmed_by: str = ""
        self.registration_qa_passed = False
        self.calibrated = False
        self.reconnects = 0
        self.last_status: dict[str, StatusMessage] = {}
        self.rejections_reported: list[StatusMessage] = []
        self._positions = Inbox(maxlen=1)
        self._lock = threading.RLock()
        self.client = IgtlClient(host, port, on_message=self._on_message, on_sent=self._on_sent,
                                 on_reject=self._on_reject, name="robot-session")

    # -------------------------------------------------------------- wiring
    def _on_sent(self, _conn, msg):
        if self.log:
            self.log.message("sent", msg)

    def _on_message(self, _conn, msg):
        if self.log:
            self.log.message("received", msg)
        if msg.type_name == "TRANSFORM" and msg.device_name == "CURRENT_POSITION":
            self._positions.put(msg)
            return
        if msg.type_name == "STATUS" and msg.device_name == "REJECTED":
            logger.warning("The robot rejected a message: %s", msg.status_string)
            self.rejections_reported.append(msg)
            return
        self.client.inbox.put(msg)

    def _on_reject(self, _conn, rej):
        if self.log:
            self.log.write("rejected", **rej.to_dict())

    def _event(self, event: str, **kw):
        logger.info("robot session: %s %s", event, kw if kw else "")
        if self.log:
            self.log.write("event", event=event, **kw)

    def connect(self, timeout: float = 3.0):
        self.client.connect(timeout)
        self._event("connected", host=self.client.host, port=self.client.port)

    def close(self):
        self._save_state()
        self.client.close()
        if self.log:
            self._event("closed")
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _ensure_connected(self):
        if self.client.connected:
            return
        last = None
        for attempt in range(self.reconnect_attempts + 1):
            try:
                self.client.connect(timeout=max(self.ack_timeout_s, 1.0))
                self.reconnects += 1
                self._event("reconnected", attempt=attempt + 1)
                return
            except RobotBridgeError as exc:
                last = exc
                time.sleep(self.reconnect_delay_s * (attempt + 1))
        raise RobotBridgeError(f"Lost the connection to the robot and could not reconnect after "
                               f"{self.reconnect_attempts + 1} attempts ({last}); check the robot and network.")

    def _new_id(self) -> str:
        self.counter += 1
        return f"{self.tag}{self.counter:04d}"

    # -------------------------------------------------------------- plan and safety
    def load_plan(self, plan: RobotPlan):
        """Set the targets; resumes their state from ``state_path`` when it matches this plan."""
        self.plan = plan
        self.registration_qa_passed = plan.registration_qa_passed
        self.plan_confirmed_by = ""
        self._load_state()
        self._event("plan_loaded", targets=[t.name for t in plan.targets],
                    registration_qa_passed=self.registration_qa_passed)

    def confirm_plan(self, operator: str = "operator"):
        """The operator reviewed and confirmed the plan (required before anything that can move the robot)."""
        if self.plan is None:
            raise RobotBridgeError("There is no plan to confirm; load the plan first.")
        self.plan_confirmed_by = operator or "operator"
        self._event("plan_confirmed", operator=self.plan_confirmed_by)

    def set_registration_qa(self, passed: bool, details: dict | None = None):
        self.registration_qa_passed = bool(passed)
        self._event("registration_qa", passed=self.registration_qa_passed, details=details or {})

    def _require_motion_allowed(self, what: str, confirm: bool):
        reason = None
        if not confirm:
            reason = f"{what} can move the robot and needs an explicit confirmation in the same request"
        elif not self.plan_confirmed_by:
            reason = f"the operator has not confirmed the plan; review and confirm it before {what}"
        elif not self.registration_qa_passed:
            reason = f"registration QA has not passed; review or redo the registration before {what}"
        if reason:
            self._event("refused_locally", what=what, reason=reason)
            raise RobotBridgeError(f"Refused: {reason}.")

    def target(self, name: str) -> RobotTarget:
        if self.plan is None:
            raise RobotBridgeError("No plan is loaded; load the plan first.")
        for t in self.plan.targets:
            if t.name == name:
                return t
        raise RobotBridgeError(f"Target {name} is not in the plan; choose one of "
                               f"{', '.join(t.name for t in self.plan.targets)}.")

    # -------------------------------------------------------------- exchanges
    def _transact(self, message, ack_match, what: str):
        """Send ``message`` and wait for its acknowledgement, re-sending the same id on timeout or after a
        reconnect; bounded by ``retries``. Returns (ack, attempts)."""
        attempts = 1 + self.retries
        for attempt in range(1, attempts + 1):
            self._ensure_connected()
            try:
                self.client.send(message)
            except RobotBridgeError:
                self._event("send_failed", what=what, attempt=attempt)
                continue
            ack = self.client.receive(ack_match, timeout=self.ack_timeout_s, abort_on_disconnect=True)
            if ack is not None:
                return ack, attempt
            why = "connection lost" if not self.client.connected else "timeout"
            self._event("no_ack", what=what, attempt=attempt, reason=why)
        raise RobotBridgeError(f"The robot did not acknowledge {what} after {attempts} attempts "
                               f"(timeout {self.ack_timeout_s:g} s each); check the robot and retry.")

    def _wait_status(self, device: str, timeout: float, resend=None, what: str = "") -> StatusMessage:
        """STATUS named ``device``; after a lost connection, reconnect and call ``resend()`` (same id)."""
        deadline = time.monotonic() + timeout
        reconnects = 0
        while True:
            remaining = deadline - time.monotonic()
            st = self.client.receive(("STATUS", device), timeout=max(0.0, remaining), abort_on_disconnect=True)
            if st is not None:
                self.last_status[device] = st
                return st
            if not self.client.connected and resend is not None and reconnects < self.reconnect_attempts + 1:
                reconnects += 1
                resend()
                continue
            if time.monotonic() >= deadline or not self.client.connected:
                raise RobotBridgeError(f"The robot sent no {device} status for {what or device} within "
                                       f"{timeout:g} s; check the robot before continuing.")

    def command(self, phase: str, *, confirm: bool = False, timeout: float | None = None) -> StatusMessage:
        """Enter a workphase: CMD_<id> -> ACK_<id> -> STATUS <phase>. Raises RobotBridgeError with the
        robot's text when it refuses. TARGETING and MOVE_TO_TARGET need ``confirm=True`` (see safety)."""
        phase = str(phase).upper()
        if phase not in PHASES:
            raise RobotBridgeError(f"{phase} is not a robot workphase; use one of {', '.join(PHASES)}.")
        if phase in MOTION_PHASES:
            self._require_motion_allowed(phase, confirm)
        if phase in ALWAYS_ALLOWED:
            return self._command_now(phase, timeout)
        with self._lock:
            return self._command_now(phase, timeout)

    def _command_now(self, phase, timeout):
        cid = self._new_id()
        self._save_state()
        msg = StringMessage(f"CMD_{cid}", phase, header_version=self.header_version)
        self.client.inbox.discard(lambda m: m.type_name == "STATUS" and m.device_name == phase)
        what = f"{phase} (CMD_{cid})"
        ack, _ = self._transact(msg, ("STRING", f"ACK_{cid}"), what)
        if ack.text != phase:
            raise RobotBridgeError(f"The robot acknowledged CMD_{cid} with {ack.text!r} instead of {phase}; "
                                   "stop and check the robot software.")

        def resend():
            self._transact(msg, ("STRING", f"ACK_{cid}"), what)

        st = self._wait_status(phase, timeout or (self.motion_timeout_s if phase == "MOVE_TO_TARGET"
                                                  else self.status_timeout_s), resend, what)
        if not st.ok:
            self._event("robot_refused", phase=phase, code=int(st.code), text=st.status_string)
            raise RobotBridgeError(f"The robot refused {phase}: {st.status_string or 'no reason given'} "
                                   f"({_code_name(st.code)}); resolve this on the robot and retry.")
        return st

    def stop(self) -> StatusMessage:
        return self.command("STOP")

    def emergency(self) -> StatusMessage:
        return self.command("EMERGENCY")

    def calibrate(self, matrix=None) -> float:
        """CALIBRATION phase and CLB_<id> TRANSFORM (robot base -> RAS, mm); returns the echo error in mm."""
        matrix = np.asarray(self.plan.calibration_matrix if matrix is None and self.plan else
                            (np.eye(4) if matrix is None else matrix), float)
        with self._lock:
            self._command_ack_only("CALIBRATION")
            cid = self._new_id()
            msg = TransformMessage(f"CLB_{cid}", matrix, header_version=self.header_version)
            echo, _ = self._transact(msg, ("TRANSFORM", f"ACK_{cid}"), f"calibration CLB_{cid}")
            dist, ang = pose_difference(matrix, echo.matrix)
            if dist > self.tolerance_mm or ang > self.tolerance_deg:
                raise RobotBridgeError(f"The robot echoed the calibration {dist:.2f} mm / {ang:.2f} deg away from "
                                       "what was sent; re-run calibration before targeting.")
            st = self._wait_status("CALIBRATION", self.status_timeout_s,
                                   lambda: self._transact(msg, ("TRANSFORM", f"ACK_{cid}"), "calibration"))
            if not st.ok:
                raise RobotBridgeError(f"The robot refused the calibration: {st.status_string} "
                                       f"({_code_name(st.code)}); re-run calibration.")
            self.calibrated = True
            return dist

    def _command_ack_only(self, phase):
        """CMD for phases whose STATUS follows a later message (CALIBRATION waits for CLB)."""
        cid = self._new_id()
        msg = StringMessage(f"CMD_{cid}", phase, header_version=self.header_version)
        self.client.inbox.discard(lambda m: m.type_name == "STATUS" and m.device_name == phase)
        self._transact(msg, ("STRING", f"ACK_{cid}"), f"{phase} (CMD_{cid})")

    def send_target(self, name: str, *, confirm: bool = False) -> RobotTarget:
        """TGT_<id> for one target (needle pose, RAS). Checks the echo against the pose computed here,
        then records reachable / unreachable with the robot's STATUS text. Re-sending a target keeps its id."""
        self._require_motion_allowed(f"sending target {name}", confirm)
        t = self.target(name)
        if t.state in ("reached", "sampled"):
            raise RobotBridgeError(f"Target {name} was already reached; it is not sent again.")
        with self._lock:
            pose = t.pose()
            if not t.target_id:
                t.target_id = self._new_id()
            tid = t.target_id
            meta = {"target_name": t.name, "region": t.region} if self.header_version == 2 else {}
            msg = TransformMessage(f"TGT_{tid}", pose, header_version=self.header_version, metadata=meta)
            if t.state == "planned":
                t.state = "sent"
            self._save_state()
            for dev in ("TARGET", ):
                self.client.inbox.discard(lambda m, d=dev: m.type_name == "STATUS" and m.device_name == d)
            self.client.inbox.discard(("TRANSFORM", "REACHABLE_TARGET"))
            counter = {"n": 0}

            def send_once():
                echo, attempts = self._transact(msg, ("TRANSFORM", f"ACK_{tid}"), f"target {name} (TGT_{tid})")
                counter["n"] += attempts
                return echo

            echo = send_once()
            t.transmissions += counter["n"]
            dist, ang = pose_difference(pose, echo.matrix)
            t.echo_error_mm, t.echo_error_deg = round(dist, 4), round(ang, 4)
            if dist > self.tolerance_mm or ang > self.tolerance_deg:
                self._event("echo_mismatch", target=name, error_mm=dist, error_deg=ang)
                self._save_state()
                raise RobotBridgeError(
                    f"The robot echoed target {name} {dist:.2f} mm / {ang:.2f} deg away from what was sent "
                    f"(tolerance {self.tolerance_mm:g} mm / {self.tolerance_deg:g} deg); do not move the robot, "
                    "check its calibration and send the target again.")
            st = self._wait_status("TARGET", self.status_timeout_s, send_once, f"target {name}")
            reach = self.client.receive(("TRANSFORM", "REACHABLE_TARGET"), timeout=self.status_timeout_s)
            if reach is not None:
                t.reachable_ras = [round(float(v), 4) for v in reach.matrix[:3, 3]]
            t.robot_status = st.status_string
            if st.ok:
                t.state = "reachable"
            elif int(st.code) == StatusCode.CONFIG_ERROR and int(st.subcode) == UNREACHABLE_SUBCODE:
                t.state = "unreachable"
            else:
                self._save_state()
                raise RobotBridgeError(f"The robot refused target {name}: {st.status_string} "
                                       f"({_code_name(st.code)}); resolve this on the robot and retry.")
            self._event("target_state", target=name, state=t.state, robot_status=st.status_string)
            self._save_state()
            return t

    def move_to_target(self, name: str, *, confirm: bool = False) -> RobotTarget:
        """MOVE_TO_TARGET for a reachable target; waits for the robot's STATUS and checks CURRENT_POSITION."""
        self._require_motion_allowed(f"moving to target {name}", confirm)
        t = self.target(name)
        if t.state != "reachable":
            raise RobotBridgeError(f"Target {name} is {t.state}, not confirmed reachable by the robot; "
                                   f"send it first{' and review the plan' if t.state == 'unreachable' else ''}.")
        self.command("MOVE_TO_TARGET", confirm=True)
        pos = self.current_position()
        err = float(np.linalg.norm(pos[:3, 3] - np.asarray(t.target_ras, float)))
        t.reached_error_mm = round(err, 4)
        if err > self.tolerance_mm:
            self._save_state()
            raise RobotBridgeError(f"The robot reports MOVE_TO_TARGET done but its needle tip is {err:.2f} mm from "
                                   f"target {name}; do not insert, check the robot.")
        t.state = "reached"
        self._event("target_state", target=name, state="reached", error_mm=err)
        self._save_state()
        return t

    def mark_sampled(self, name: str) -> RobotTarget:
        t = self.target(name)
        if t.state != "reached":
            raise RobotBridgeError(f"Target {name} is {t.state}; only a reached target can be marked sampled.")
        t.state = "sampled"
        self._event("target_state", target=name, state="sampled")
        self._save_state()
        return t

    def current_position(self, timeout: float | None = None) -> np.ndarray:
        """Poll CURRENT_POSITION (GET_TRANS query) and return the 4x4 needle pose (RAS, mm)."""
        timeout = self.status_timeout_s if timeout is None else timeout
        for attempt in range(1 + self.retries):
            self._ensure_connected()
            self._positions.discard(None)
            try:
                self.client.send(query_message("GET_TRANS", "CURRENT_POSITION", header_version=self.header_version))
            except RobotBridgeError:
                continue
            msg = self._positions.get(None, timeout / (1 + self.retries))
            if msg is not None:
                return msg.matrix
        raise RobotBridgeError("The robot did not report CURRENT_POSITION; check the robot connection.")

    # -------------------------------------------------------------- whole session
    def run_plan(self, *, confirm: bool = False, progress=None, should_cancel=None) -> SessionResult:
        """START_UP, CALIBRATION, PLANNING, then per target TARGETING -> TGT -> MOVE_TO_TARGET.

        Targets already reached (resumed state) are skipped; unreachable ones are reported, not moved to.
        Requires ``confirm=True``, the operator's plan confirmation and a passed registration QA."""
        if self.plan is None:
            raise RobotBridgeError("No plan is loaded; load the plan first.")
        self._require_motion_allowed("running the plan", confirm)
        steps = 3 + len(self.plan.targets)
        done = 0

        def report(msg):
            if progress:
                progress(min(1.0, done / steps), msg)

        report("starting up")
        self.command("START_UP")
        done += 1
        report("calibrating")
        self.calibrate()
        done += 1
        self.command("PLANNING")
        done += 1
        for t in self.plan.targets:
            if should_cancel and should_cancel():
                self._event("cancelled")
                return SessionResult(self.plan.targets, False, True, str(self.log.path) if self.log else "")
            report(f"target {t.name}")
            if t.state in ("reached", "sampled", "unreachable"):
                done += 1
                continue
            self.command("TARGETING", confirm=True)
            self.send_target(t.name, confirm=True)
            if t.state == "reachable":
                self.move_to_target(t.name, confirm=True)
            done += 1
        report("done")
        completed = all(t.state in ("reached", "sampled") for t in self.plan.targets)
        return SessionResult(self.plan.targets, completed, False, str(self.log.path) if self.log else "")

    # -------------------------------------------------------------- state file
    def _state_dict(self) -> dict:
        return {"tag": self.tag, "counter": self.counter,
                "targets": [t.to_dict() for t in (self.plan.targets if self.plan else [])]}

    def _save_state(self):
        if not self.state_path or self.plan is None:
            return
        tmp = self.state_path.with_suffix(self.state_path.suffix + ".tmp")
        tmp.write_text(json.dumps(self._state_dict(), indent=1, default=_json_default))
        os.replace(tmp, self.state_path)

    def _load_state(self):
        if not self.state_path or not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise RobotBridgeError(f"Session state {self.state_path} is unreadable ({exc}); remove it to start a "
                                   "new session.") from exc
        saved = {t["name"]: t for t in data.get("targets", [])}
        for t in self.plan.targets:
            s = saved.get(t.name)
            if s is None:
                continue
            if (np.max(np.abs(np.subtract(s["target_ras"], t.target_ras))) > 1e-6
                    or np.max(np.abs(np.subtract(s["entry_ras"], t.entry_ras))) > 1e-6):
                raise RobotBridgeError(f"Session state {self.state_path} belongs to a different plan (target {t.name} "
                                       "moved); remove it to start a new session.")
            for k in ("state", "target_id", "transmissions", "echo_error_mm", "echo_error_deg", "reachable_ras",
                      "robot_status", "reached_error_mm"):
                setattr(t, k, s.get(k, getattr(t, k)))
        self.tag = str(data.get("tag", self.tag))
        self.counter = int(data.get("counter", 0))
        self._event("state_resumed", path=str(self.state_path),
                    states={t.name: t.state for t in self.plan.targets})


def _code_name(code) -> str:
    try:
        return StatusCode(int(code)).name
    except ValueError:
        return f"code {code}"

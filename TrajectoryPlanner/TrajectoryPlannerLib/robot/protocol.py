"""Robot session over OpenIGTLink: the workphase protocol of open MRI/CT needle-guidance robots.

Two protocol profiles (``profile=``, written in the session log):

``smartbiopsy`` (this project's robot simulator; navigation = this client, robot = server)

* ``CMD_<id>`` STRING whose text is a phase (START_UP, CALIBRATION, PLANNING, TARGETING,
  MOVE_TO_TARGET, MANUAL, STOP, EMERGENCY) -> ``ACK_<id>`` STRING (same text), then a STATUS named after
  the phase when the phase is entered (CALIBRATION: after the CLB transform; MOVE_TO_TARGET: when the
  target is reached). A STATUS code other than OK is a refusal; its text is shown to the user.
* ``CLB_<id>`` TRANSFORM (robot base -> RAS, mm) during CALIBRATION -> echo ``ACK_<id>`` TRANSFORM and
  STATUS CALIBRATION.
* ``TGT_<id>`` TRANSFORM during TARGETING: translation = target point (RAS, mm), third rotation column =
  needle direction (unit vector entry -> target, RAS) -> echo ``ACK_<id>`` TRANSFORM, STATUS TARGET
  (OK, or CONFIG_ERROR with subcode 3 when unreachable) and TRANSFORM ``REACHABLE_TARGET``.
* ``GET_TRANS`` query ``CURRENT_POSITION`` -> TRANSFORM ``CURRENT_POSITION`` (also pushed during motion).

``brp`` (ProstateBRP's BRPRobotComm order and meaning)

* ``CMD_<id>`` -> ``ACK_<id>`` STRING (the phase), STATUS ``CURRENT_STATUS`` (OK, error name = the phase
  entered), then STATUS ``<phase>`` (OK or a refusal code). A forbidden transition is not answered.
* START_UP: STRING ``NEEDLE_LENGTH`` (mm as text) -> STRING ``ACK_NEEDLE_LENGTH`` with the same text.
* CALIBRATION: STATUS CALIBRATION on entry; ``CLB_<id>`` -> echo ``ACK_<id>``, TRANSFORM REACHABLE_TARGET,
  STATUS CALIBRATION (OK or CONFIG_ERROR).
* TARGETING: ``TGT_<id>`` -> echo, STATUS TARGET (OK / CONFIG_ERROR subcode 3), TRANSFORM REACHABLE_TARGET;
  the robot then moves to the targeting position (needle guide aligned, needle home).
* STRING query ``CURRENT_POSITION`` -> TRANSFORM CURRENT_POSITION, STRING ``IS_IN_TARGETING_POS`` and
  STRING ``HAS_REACHED_TARGET`` ("1"/"0").
* MOVE_TO_TARGET: STATUS MOVE_TO_TARGET OK means "in targeting position, ready to insert" (NOT_READY
  otherwise), followed by TRANSFORM CURRENT_POSITION; the needle has reached the target when
  HAS_REACHED_TARGET is "1". ``NPOS_<id>`` TRANSFORM (needle tip seen in the confirmation image) ->
  echo ``ACK_<id>`` and STATUS MOVE_TO_TARGET.
* STRING ``RETRACT_NEEDLE`` in MOVE_TO_TARGET -> STATUS ``ACK_RETRACT_NEEDLE``, then STATUS
  ``RETRACT_NEEDLE`` when the needle is home; needed before the next TARGETING.

Every reply is tied to what it answers: a STATUS (or REACHABLE_TARGET) counts only when it arrived after
the acknowledgement of the message it answers, never an earlier one. Every echo (first transmission and
every re-send after a timeout or reconnect) is compared with the pose this session computed and kept
before sending, in position (``tolerance_mm``) and rotation (``tolerance_deg``); REACHABLE_TARGET of a
reachable target must equal the target sent; every pose received must be rigid (rotation orthonormal
within 1e-3, determinant +1, finite).

Ids are ``<4 hex session tag><4 digit counter>``; a message re-sent after a timeout or a reconnect keeps
its id so the robot recognises it and does not act twice. Acknowledgements have a timeout and a bounded
number of attempts; a dropped connection is re-established (bounded).

Safety: TARGETING, sending a target and MOVE_TO_TARGET need (1) the operator's plan confirmation,
(2) a registration QA that passed strictly (:func:`registration_qa_problem`), (3) a robot calibration
(``smartbiopsy.robot_calibration/1``, :mod:`calibration_io`) or the explicit statement that the robot
works in CT coordinates, and (4) ``confirm=True`` in the same call. STOP and EMERGENCY are always sent.
:meth:`RobotSession.emergency_stop` sends STOP and waits (bounded) for its acknowledgement; the command
line calls it on SIGINT, SIGTERM or any error while motion may be in progress, and the Slicer module on
STOP, module exit and scene close (``close(stop_if_moving=True)``).

Plan file: the planner's ``plan.json`` (``smartbiopsy plan``; ``trajectories`` with ``name`` "A-1",
``target`` "A", ``rank``); by default the best-ranked path per target, or the paths named in ``paths``.
Registration QA: the plan's ``registration_qa`` or the registration's ``qa.json``.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from TrajectoryPlannerLib.errors import RobotBridgeError
from TrajectoryPlannerLib.robot.calibration_io import RobotCalibration, require_rigid, rigid_problem
from TrajectoryPlannerLib.robot.codec import (StatusCode, StatusMessage, StringMessage, TransformMessage,
                                              query_message)
from TrajectoryPlannerLib.robot.transport import IgtlClient, Inbox
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)

PHASES = ("START_UP", "CALIBRATION", "PLANNING", "TARGETING", "MOVE_TO_TARGET", "MANUAL", "STOP", "EMERGENCY")
MOTION_PHASES = frozenset({"TARGETING", "MOVE_TO_TARGET"})
ALWAYS_ALLOWED = frozenset({"STOP", "EMERGENCY"})
TARGET_STATES = ("planned", "sent", "reachable", "unreachable", "in_position", "reached", "sampled")
MAX_TARGETS = 3
UNREACHABLE_SUBCODE = 3
PROFILES = ("smartbiopsy", "brp")
ROBOT_FRAMES = ("calibrated", "ct")
#: Device names an observer (e.g. Slicer OpenIGTLinkIF) sees; fixed, never per message id.
OBSERVER_DEVICES = ("TARGET", "REACHABLE_TARGET", "CURRENT_POSITION", "CURRENT_STATUS", "CALIBRATION")


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


# ------------------------------------------------------------------------------------- QA gate
def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


#: A QA target entry covers a robot target of another name when its CT RAS point ("ras") is this close (mm).
QA_POINT_MATCH_MM = 2.0


def registration_qa_problem(qa, target_names=(), target_points=None) -> str | None:
    """None when the registration QA lets targets go to the robot; otherwise why not (a phrase).

    Passes only when ``qa["passed"]`` is the JSON boolean ``true``, no failure is listed, and the QA gives a
    finite predicted error (``targets[*].predicted_tre_mm``, mm) within its threshold
    (``targets[*].max_predicted_tre_mm`` or ``thresholds.max_predicted_tre_mm``, mm) for every target in
    ``target_names``: the entry of the same name, or one whose ``ras`` point lies within
    ``QA_POINT_MATCH_MM`` of the target's point (``target_points``, CT RAS mm, same order). This is the
    format of the registration's ``qa.json``."""
    if not isinstance(qa, dict) or not qa:
        return "the plan carries no registration QA"
    if qa.get("passed") is not True:
        return f"registration QA did not pass ('passed' is {jsonio.dumps(qa.get('passed'), default=str)}, not true)"
    failures = qa.get("failures")
    if failures:
        return f"registration QA lists failures ({'; '.join(map(str, failures))[:200]})"
    thresholds = qa.get("thresholds")
    default_thr = _number(thresholds.get("max_predicted_tre_mm")) if isinstance(thresholds, dict) else None
    entries = qa.get("targets")
    if not isinstance(entries, list) or not entries:
        return "the registration QA gives no predicted error at the targets"
    seen = {}
    points = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            return "the registration QA has a target entry without a name"
        name = e["name"]
        tre = _number(e.get("predicted_tre_mm"))
        thr = _number(e["max_predicted_tre_mm"]) if "max_predicted_tre_mm" in e else default_thr
        if tre is None or tre < 0:
            return f"the registration QA gives no valid predicted error at target {name}"
        if thr is None or thr <= 0:
            return f"the registration QA gives no valid threshold for the predicted error at target {name}"
        if tre > thr:
            return (f"the predicted registration error at target {name} is {tre:.1f} mm, over its {thr:g} mm "
                    "threshold")
        seen[name] = tre
        ras = e.get("ras")
        if isinstance(ras, list) and len(ras) == 3 and all(_number(v) is not None for v in ras):
            points.append(np.asarray(ras, float))
    names = list(target_names)
    pts = list(target_points) if target_points is not None else [None] * len(names)

    def covered(name, point):
        if name in seen:
            return True
        return point is not None and any(float(np.linalg.norm(np.asarray(point, float) - q)) <= QA_POINT_MATCH_MM
                                         for q in points)

    missing = [n for n, p in zip(names, pts) if not covered(n, p)]
    if missing:
        return f"the registration QA gives no predicted error at target {', '.join(missing)}"
    return None


# -------------------------------------------------------------------------------------------- plan
@dataclass
class RobotTarget:
    """One biopsy target and its state in the robot session (RAS, mm). ``name`` is the planner's path
    name (e.g. "A-1"), ``target`` the planner's target (e.g. "A")."""

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
    target: str = ""

    def __post_init__(self):
        self.target = self.target or self.name

    def pose(self) -> np.ndarray:
        return needle_pose(self.entry_ras, self.target_ras)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "target", "region", "entry_ras", "target_ras", "state",
                                               "target_id", "transmissions", "echo_error_mm", "echo_error_deg",
                                               "reachable_ras", "robot_status", "reached_error_mm")}


def _choices_text(trajs) -> str:
    return ", ".join(f"{t.get('name')} (target {t.get('target') or t.get('name')}"
                     + (f", rank {t['rank']})" if "rank" in t else ")") for t in trajs)


def select_trajectories(data: dict, paths=None) -> list:
    """Trajectory dicts to send: the named ``paths`` (e.g. ["A-1", "B-2"]) or the best-ranked path per
    target; RobotBridgeError listing the choices when the input is ambiguous or too large."""
    trajs = data.get("trajectories")
    if not isinstance(trajs, list) or not all(isinstance(t, dict) for t in trajs):
        raise RobotBridgeError("The plan has no 'trajectories' list; export the plan from the planner again.")
    shared = data.get("shared_entry")
    extra = [t for t in (shared.get("trajectories") or []) if isinstance(t, dict)] if isinstance(shared, dict) else []
    names = [str(t.get("name") or f"T{i + 1}") for i, t in enumerate(trajs)]
    for n in set(names):
        if names.count(n) > 1:
            raise RobotBridgeError(f"Two trajectories are named {n}; give each a unique name.")
    if paths:
        pool = {str(t.get("name") or f"T{i + 1}"): t for i, t in enumerate(trajs)}
        pool.update({str(t.get("name")): t for t in extra if t.get("name") and str(t.get("name")) not in pool})
        chosen = []
        for p in paths:
            if p not in pool:
                raise RobotBridgeError(f"Path {p} is not in the plan; choose from {_choices_text(pool.values())}.")
            chosen.append(pool[p])
        targets = [str(t.get("target") or t.get("name")) for t in chosen]
        for tg in set(targets):
            if targets.count(tg) > 1:
                raise RobotBridgeError(f"More than one path was chosen for target {tg} "
                                       f"({', '.join(p for p, x in zip(paths, targets) if x == tg)}); choose one.")
    else:
        groups: dict = {}
        for i, t in enumerate(trajs):
            groups.setdefault(str(t.get("target") or names[i]), []).append(t)
        chosen = []
        for tg, group in groups.items():
            if len(group) == 1:
                chosen.append(group[0])
                continue
            ranks = [t.get("rank") for t in group]
            if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks) or ranks.count(min(ranks)) > 1:
                raise RobotBridgeError(f"The plan has several paths for target {tg} without one best rank; choose one "
                                       f"with --paths from {_choices_text(group)}.")
            chosen.append(group[ranks.index(min(ranks))])
    if not 1 <= len(chosen) <= MAX_TARGETS:
        raise RobotBridgeError(f"The plan has {len(chosen)} targets; a robot session takes 1 to {MAX_TARGETS}: choose "
                               f"the paths with --paths from {_choices_text(trajs + extra)}.")
    return chosen


@dataclass
class RobotPlan:
    """What is sent to the robot: up to three targets, the registration QA (strict gate) and the robot frame.

    ``calibration`` (robot base -> CT RAS) comes only from a validated calibration file; ``robot_frame``
    is "calibrated" with one, "ct" when the operator stated the robot works in CT coordinates, or "" (no
    targeting)."""

    targets: list
    registration_qa: dict = field(default_factory=dict)
    calibration: RobotCalibration | None = None
    robot_frame: str = ""
    robot_frame_statement: str = ""
    needle_length_mm: float | None = None

    @property
    def registration_qa_problem(self) -> str | None:
        return registration_qa_problem(self.registration_qa, [t.target for t in self.targets],
                                       [t.target_ras for t in self.targets])

    @property
    def registration_qa_passed(self) -> bool:
        return self.registration_qa_problem is None

    @property
    def calibration_matrix(self) -> np.ndarray | None:
        """Robot base -> CT RAS (mm) sent in CALIBRATION; identity only after the explicit CT statement."""
        if self.robot_frame == "calibrated" and self.calibration is not None:
            return np.asarray(self.calibration.matrix_robot_to_ct_ras, float)
        if self.robot_frame == "ct":
            return np.eye(4)
        return None

    def use_calibration(self, calibration: RobotCalibration):
        """Robot base -> CT RAS from a validated ``smartbiopsy.robot_calibration/1`` file."""
        if not isinstance(calibration, RobotCalibration):
            raise RobotBridgeError("The robot calibration must be loaded with load_robot_calibration.")
        self.calibration, self.robot_frame, self.robot_frame_statement = calibration, "calibrated", ""

    def state_robot_frame_ct(self, stated_by: str):
        """The operator states that the robot reports and accepts CT RAS coordinates (no calibration)."""
        if not str(stated_by or "").strip():
            raise RobotBridgeError("Say who states that the robot works in CT coordinates.")
        self.calibration, self.robot_frame = None, "ct"
        self.robot_frame_statement = f"robot frame = CT RAS, stated explicitly by {stated_by}"

    @classmethod
    def from_dict(cls, data: dict, paths=None, registration_qa: dict | None = None) -> "RobotPlan":
        if not isinstance(data, dict):
            raise RobotBridgeError("The plan has no 'trajectories' list; export the plan from the planner again.")
        if "calibration_matrix" in data:
            raise RobotBridgeError("The plan carries a 'calibration_matrix'; the robot calibration is only taken from "
                                   "a smartbiopsy.robot_calibration/1 file (--calibration) or --robot-frame ct.")
        trajs = select_trajectories(data, paths)
        targets = []
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
            needle_pose(entry, target)  # validates entry != target
            targets.append(RobotTarget(name, str(t.get("region") or t.get("target") or name), entry, target,
                                       target=str(t.get("target") or name)))
        qa = registration_qa if registration_qa is not None else data.get("registration_qa")
        needle = data.get("needle")
        length = None
        if isinstance(needle, dict) and isinstance(needle.get("core"), dict):
            length = _number(needle["core"].get("usable_length_mm"))
        return cls(targets, qa if isinstance(qa, dict) else {}, needle_length_mm=length)

    @classmethod
    def load(cls, path, paths=None, registration_qa_path=None) -> "RobotPlan":
        data = _read_json(path, "Plan file", "export the plan again")
        qa = None
        if registration_qa_path is not None:
            qa = _read_json(registration_qa_path, "Registration QA file", "write it with the registration again")
            if not isinstance(qa, dict):
                raise RobotBridgeError(f"Registration QA file {registration_qa_path} is not a JSON object; write it "
                                       "with the registration again.")
        return cls.from_dict(data, paths, qa)


def _read_json(path, what, fix):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise RobotBridgeError(f"{what} {path} does not exist; check the path.") from exc
    except (OSError, ValueError) as exc:
        raise RobotBridgeError(f"{what} {path} is not readable JSON ({exc}); {fix}.") from exc


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
        line = jsonio.dumps(rec, default=_json_default)
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
    profile: str = "smartbiopsy"
    robot_frame: str = ""

    def to_dict(self) -> dict:
        return {"targets": [t.to_dict() for t in self.targets], "completed": self.completed,
                "cancelled": self.cancelled, "log_path": self.log_path, "profile": self.profile,
                "robot_frame": self.robot_frame}


class RobotSession:
    """Client side of the robot protocol (used by the Slicer module and ``smartbiopsy robot-send``).

    Timeouts in seconds, tolerances in mm and degrees. ``retries`` extra attempts per acknowledgement;
    ``reconnect_attempts`` per lost connection. ``state_path`` (optional JSON) keeps ids and target states
    so a later session resumes without losing or re-sending a target. ``profile`` "smartbiopsy" or "brp"
    (see the module docstring). ``workspace_mm`` (optional ``(lower, upper)`` box in the robot frame, mm):
    targets outside are refused before sending.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 18944, *, log_path=None, state_path=None,
                 ack_timeout_s: float = 1.0, status_timeout_s: float = 5.0, motion_timeout_s: float = 120.0,
                 retries: int = 2, reconnect_attempts: int = 3, reconnect_delay_s: float = 0.2,
                 tolerance_mm: float = 0.5, tolerance_deg: float = 0.5, header_version: int = 1,
                 profile: str = "smartbiopsy", poll_period_s: float = 0.05, workspace_mm=None):
        if not (tolerance_mm > 0 and tolerance_deg > 0):
            raise RobotBridgeError("Echo tolerances must be positive (mm and degrees).")
        if profile not in PROFILES:
            raise RobotBridgeError(f"Robot protocol profile {profile!r} is unknown; use one of {', '.join(PROFILES)}.")
        self.profile = profile
        self.ack_timeout_s = float(ack_timeout_s)
        self.status_timeout_s = float(status_timeout_s)
        self.motion_timeout_s = float(motion_timeout_s)
        self.poll_period_s = float(poll_period_s)
        self.retries = max(0, int(retries))
        self.reconnect_attempts = max(0, int(reconnect_attempts))
        self.reconnect_delay_s = float(reconnect_delay_s)
        self.tolerance_mm = float(tolerance_mm)
        self.tolerance_deg = float(tolerance_deg)
        self.header_version = header_version
        self.workspace_mm = None
        if workspace_mm is not None:
            lo, hi = (np.asarray(v, float).reshape(3) for v in workspace_mm)
            if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo < hi)):
                raise RobotBridgeError("The robot workspace needs finite lower < upper bounds in mm.")
            self.workspace_mm = (lo, hi)
        self.log = SessionLog(log_path) if log_path else None
        self.state_path = Path(state_path) if state_path else None
        self.tag = secrets.token_hex(2)
        self.counter = 0
        self.plan: RobotPlan | None = None
        self.plan_confirmed_by: str = ""
        self.calibrated = False
        self.reconnects = 0
        self.last_status: dict[str, StatusMessage] = {}
        self.rejections_reported: list[StatusMessage] = []
        #: True from the first command that can move the robot until its motion is confirmed finished or a
        #: STOP is acknowledged; :meth:`close` sends STOP while it is set.
        self.motion_possible = False
        self._needle_out = False          # brp: needle inserted, RETRACT_NEEDLE due before the next TARGETING
        self._stop_sent = False           # STOP/EMERGENCY sent: waits for motion end at once
        self.phase = ""                   # last workphase the robot confirmed
        self._qa_override: dict | None = None
        self._id_lock = threading.Lock()
        counter = itertools.count(1)
        self._positions = Inbox(maxlen=1, counter=counter)
        self._lock = threading.RLock()
        self.client = IgtlClient(host, port, on_message=self._on_message, on_sent=self._on_sent,
                                 on_reject=self._on_reject, name="robot-session")
        self.client.inbox = Inbox(counter=counter)
        self._event("session_started", profile=profile, host=host, port=int(port), header_version=header_version)

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
            del self.rejections_reported[:-100]
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

    def close(self, stop_if_moving: bool = True, stop_timeout_s: float = 2.0):
        """End the session. With ``stop_if_moving`` (default) a STOP is sent first, and its acknowledgement
        awaited (bounded), when motion may be in progress. Safe to call more than once."""
        if stop_if_moving and self.motion_possible:
            self.emergency_stop(stop_timeout_s)
        self._save_state()
        self.client.close()
        if self.log:
            self._event("closed")
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def emergency_stop(self, timeout_s: float = 2.0) -> bool:
        """Send STOP now (a new id, no lock, reconnecting once if needed) and wait at most ``timeout_s``
        seconds for its acknowledgement. True when acknowledged. Never raises; for the GUI's STOP button,
        module exit, scene close and the command line's interrupt handling."""
        deadline = time.monotonic() + max(0.1, float(timeout_s))
        self._event("emergency_stop", motion_possible=self.motion_possible)
        self._stop_sent = True
        for _attempt in range(2):
            try:
                if not self.client.connected:
                    self.client.connect(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                cid = self._new_id()
                self.client.send(StringMessage(f"CMD_{cid}", "STOP", header_version=self.header_version))
                ack = self.client.receive(("STRING", f"ACK_{cid}"), timeout=max(0.0, deadline - time.monotonic()),
                                          abort_on_disconnect=True)
            except Exception as exc:  # noqa: BLE001 - this path must never raise
                self._event("emergency_stop_failed", reason=str(exc))
                ack = None
            if ack is not None and ack.text.strip().upper() == "STOP":
                self.motion_possible = False
                self._event("emergency_stop_acknowledged", id=cid)
                return True
            if time.monotonic() >= deadline:
                break
        self._event("emergency_stop_not_acknowledged")
        logger.error("STOP was not acknowledged by the robot within %.1f s; stop the robot at its console.", timeout_s)
        return False

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
        with self._id_lock:     # emergency_stop may run beside a session thread
            self.counter += 1
            return f"{self.tag}{self.counter:04d}"

    # -------------------------------------------------------------- plan and safety
    def load_plan(self, plan: RobotPlan):
        """Set the targets; resumes their state from ``state_path`` when it matches this plan."""
        self.plan = plan
        self.plan_confirmed_by = ""
        self._qa_override = None
        self._load_state()
        self._event("plan_loaded", targets=[t.name for t in plan.targets],
                    registration_qa_passed=plan.registration_qa_passed,
                    registration_qa_problem=plan.registration_qa_problem)
        if plan.robot_frame:
            self._log_robot_frame()

    def use_calibration(self, calibration: RobotCalibration):
        """Robot base -> CT RAS from a validated calibration file (see :mod:`calibration_io`)."""
        self._need_plan().use_calibration(calibration)
        self.calibrated = False
        self._log_robot_frame()

    def state_robot_frame_ct(self, stated_by: str):
        """The operator's explicit statement that the robot works in CT RAS coordinates (logged)."""
        self._need_plan().state_robot_frame_ct(stated_by)
        self.calibrated = False
        self._log_robot_frame()

    def _log_robot_frame(self):
        p = self.plan
        if p.robot_frame == "calibrated":
            self._event("robot_frame", frame="calibrated", calibration_path=p.calibration.path,
                        source=p.calibration.source, qa=p.calibration.qa,
                        matrix_robot_to_ct_ras=p.calibration.matrix_robot_to_ct_ras)
        else:
            logger.warning("Robot frame stated to be CT RAS (no robot calibration): %s", p.robot_frame_statement)
            self._event("robot_frame", frame="ct", statement=p.robot_frame_statement)

    def _need_plan(self) -> RobotPlan:
        if self.plan is None:
            raise RobotBridgeError("No plan is loaded; load the plan first.")
        return self.plan

    def confirm_plan(self, operator: str = "operator"):
        """The operator reviewed and confirmed the plan (required before anything that can move the robot)."""
        if self.plan is None:
            raise RobotBridgeError("There is no plan to confirm; load the plan first.")
        self.plan_confirmed_by = operator or "operator"
        self._event("plan_confirmed", operator=self.plan_confirmed_by)

    def set_registration_qa(self, qa: dict):
        """Replace the plan's registration QA (e.g. the approved transform's qa.json); the same strict gate
        applies (:func:`registration_qa_problem`)."""
        self._qa_override = dict(qa) if isinstance(qa, dict) else {}
        self._event("registration_qa", problem=self.registration_qa_problem, details=self._qa_override)

    @property
    def registration_qa_problem(self) -> str | None:
        if self.plan is None:
            return "no plan is loaded"
        qa = self._qa_override if self._qa_override is not None else self.plan.registration_qa
        return registration_qa_problem(qa, [t.target for t in self.plan.targets],
                                       [t.target_ras for t in self.plan.targets])

    @property
    def registration_qa_passed(self) -> bool:
        return self.registration_qa_problem is None

    def _require_motion_allowed(self, what: str, confirm: bool):
        reason = None
        if not confirm:
            reason = f"{what} can move the robot and needs an explicit confirmation in the same request"
        elif not self.plan_confirmed_by:
            reason = f"the operator has not confirmed the plan; review and confirm it before {what}"
        elif self.registration_qa_problem:
            reason = f"registration QA has not passed ({self.registration_qa_problem}); review or redo the " \
                     f"registration before {what}"
        elif self.plan.calibration_matrix is None:
            reason = (f"there is no robot calibration; give the calibration file or state explicitly that the robot "
                      f"works in CT coordinates (--robot-frame ct) before {what}")
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
    def _transact(self, message, ack_match, what: str, check=None):
        """Send ``message`` and wait for its acknowledgement, re-sending the same id on timeout or after a
        reconnect; bounded by ``retries``. ``check(ack)`` runs on every acknowledgement (it raises on a bad
        echo). Returns (ack, attempts)."""
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
                if check is not None:
                    check(ack)
                return ack, attempt
            why = "connection lost" if not self.client.connected else "timeout"
            self._event("no_ack", what=what, attempt=attempt, reason=why)
        raise RobotBridgeError(f"The robot did not acknowledge {what} after {attempts} attempts "
                               f"(timeout {self.ack_timeout_s:g} s each); check the robot and retry.")

    def _wait_reply(self, type_name: str, device: str, after_seq: int, timeout: float, resend=None,
                    what: str = ""):
        """The first ``type_name``/``device`` message that arrived after ``after_seq`` (the acknowledgement of
        the message it answers); older ones are stale and ignored. After a lost connection, reconnect and
        call ``resend()`` (same id)."""
        deadline = time.monotonic() + timeout
        reconnects = 0

        def match(m):
            return m.type_name == type_name and m.device_name == device and m.arrival_seq > after_seq

        while True:
            remaining = deadline - time.monotonic()
            msg = self.client.receive(match, timeout=max(0.0, remaining), abort_on_disconnect=True)
            if msg is not None:
                if type_name == "STATUS":
                    self.last_status[device] = msg
                return msg
            if not self.client.connected and resend is not None and reconnects < self.reconnect_attempts + 1:
                reconnects += 1
                resend()
                continue
            if time.monotonic() >= deadline or not self.client.connected:
                raise RobotBridgeError(f"The robot sent no {device} {type_name.lower()} for {what or device} within "
                                       f"{timeout:g} s; check the robot before continuing.")

    def _discard_stale(self, type_name: str, device: str):
        self.client.inbox.discard(lambda m: m.type_name == type_name and m.device_name == device)

    def command(self, phase: str, *, confirm: bool = False, timeout: float | None = None) -> StatusMessage:
        """Enter a workphase: CMD_<id> -> ACK_<id> -> (brp: STATUS CURRENT_STATUS ->) STATUS <phase>. Raises
        RobotBridgeError with the robot's text when it refuses. TARGETING and MOVE_TO_TARGET need
        ``confirm=True`` (see safety)."""
        phase = str(phase).upper()
        if phase not in PHASES:
            raise RobotBridgeError(f"{phase} is not a robot workphase; use one of {', '.join(PHASES)}.")
        if phase in MOTION_PHASES:
            self._require_motion_allowed(phase, confirm)
        if phase in ALWAYS_ALLOWED:
            st = self._command_now(phase, timeout)
            self.motion_possible = False
            return st
        with self._lock:
            if phase == "TARGETING" and self._needle_out:
                self.retract_needle()
            return self._command_now(phase, timeout)

    def _command_now(self, phase, timeout, wait_status: bool = True):
        cid = self._new_id()
        self._save_state()
        msg = StringMessage(f"CMD_{cid}", phase, header_version=self.header_version)
        for dev in (phase, "CURRENT_STATUS"):
            self._discard_stale("STATUS", dev)
        what = f"{phase} (CMD_{cid})"
        if phase in MOTION_PHASES:
            self.motion_possible = True
        seen = {}

        def check(ack):
            if ack.text.strip().upper() != phase:
                raise RobotBridgeError(f"The robot acknowledged CMD_{cid} with {ack.text!r} instead of {phase}; "
                                       "stop and check the robot software.")
            seen.setdefault("seq", ack.arrival_seq)

        self._transact(msg, ("STRING", f"ACK_{cid}"), what, check)
        if not wait_status:
            return None

        def resend():
            self._transact(msg, ("STRING", f"ACK_{cid}"), what, check)

        after = seen["seq"]
        if self.profile == "brp":
            cur = self._wait_reply("STATUS", "CURRENT_STATUS", after, self.status_timeout_s, resend, what)
            if not cur.ok or cur.error_name.strip().upper() != phase:
                raise RobotBridgeError(f"The robot reports its current phase as {cur.error_name or '?'} "
                                       f"({_code_name(cur.code)}) after {what}; stop and check the robot.")
            after = cur.arrival_seq
        long_wait = phase == "MOVE_TO_TARGET" and self.profile == "smartbiopsy"
        st = self._wait_reply("STATUS", phase, after, timeout or (self.motion_timeout_s if long_wait
                                                                   else self.status_timeout_s), resend, what)
        if not st.ok:
            self._event("robot_refused", phase=phase, code=int(st.code), text=st.status_string)
            raise RobotBridgeError(f"The robot refused {phase}: {st.status_string or 'no reason given'} "
                                   f"({_code_name(st.code)}); resolve this on the robot and retry.")
        self.phase = phase
        if phase not in ALWAYS_ALLOWED:
            self._stop_sent = False
        return st

    def stop(self) -> StatusMessage:
        return self.command("STOP")

    def emergency(self) -> StatusMessage:
        return self.command("EMERGENCY")

    def _check_pose_echo(self, sent: np.ndarray, echo, what: str, record=None) -> tuple[float, float]:
        problem = rigid_problem(echo.matrix)
        if problem:
            self._event("echo_invalid", what=what, problem=problem)
            raise RobotBridgeError(f"The robot echoed {what} with a matrix that {problem}; do not move the robot, "
                                   "check its software.")
        dist, ang = pose_difference(sent, echo.matrix)
        if record is not None:
            record(dist, ang)
        if dist > self.tolerance_mm or ang > self.tolerance_deg:
            self._event("echo_mismatch", what=what, error_mm=dist, error_deg=ang)
            raise RobotBridgeError(
                f"The robot echoed {what} {dist:.2f} mm / {ang:.2f} deg away from what was sent "
                f"(tolerance {self.tolerance_mm:g} mm / {self.tolerance_deg:g} deg); do not move the robot, "
                "check its calibration and send it again.")
        return dist, ang

    def calibrate(self, matrix=None) -> float:
        """CALIBRATION phase and CLB_<id> TRANSFORM (robot base -> RAS, mm); returns the echo error in mm.
        The matrix comes from the plan's calibration file or the explicit CT statement; never a default."""
        if matrix is None:
            matrix = self._need_plan().calibration_matrix
        if matrix is None:
            raise RobotBridgeError("Refused: there is no robot calibration; give the calibration file or state "
                                   "explicitly that the robot works in CT coordinates (--robot-frame ct).")
        matrix = require_rigid(matrix, "robot calibration")
        with self._lock:
            if self.profile == "brp":
                self._command_now("CALIBRATION", None)
            else:
                self._command_now("CALIBRATION", None, wait_status=False)
            cid = self._new_id()
            msg = TransformMessage(f"CLB_{cid}", matrix, header_version=self.header_version)
            self._discard_stale("STATUS", "CALIBRATION")
            self._discard_stale("TRANSFORM", "REACHABLE_TARGET")
            what = f"calibration CLB_{cid}"
            seen = {}

            def check(echo):
                seen["dist"] = self._check_pose_echo(matrix, echo, "the calibration")[0]
                seen.setdefault("seq", echo.arrival_seq)

            self._transact(msg, ("TRANSFORM", f"ACK_{cid}"), what, check)
            st = self._wait_reply("STATUS", "CALIBRATION", seen["seq"], self.status_timeout_s,
                                  lambda: self._transact(msg, ("TRANSFORM", f"ACK_{cid}"), what, check), what)
            if not st.ok:
                self._event("robot_refused", phase="CALIBRATION", code=int(st.code), text=st.status_string)
                raise RobotBridgeError(f"The robot refused the calibration: {st.status_string or 'no reason given'} "
                                       f"({_code_name(st.code)}); re-run calibration.")
            self.calibrated = True
            self._event("calibrated", echo_error_mm=seen["dist"])
            return seen["dist"]

    def send_needle_length(self, length_mm: float):
        """brp START_UP: STRING NEEDLE_LENGTH (mm) -> STRING ACK_NEEDLE_LENGTH with the same text."""
        v = _number(length_mm)
        if v is None or v <= 0:
            raise RobotBridgeError("The needle length must be a positive number of mm.")
        text = f"{v:.1f}"

        def check(ack):
            if ack.text.strip() != text:
                raise RobotBridgeError(f"The robot acknowledged needle length {ack.text!r} instead of {text} mm; "
                                       "check the robot software.")

        self._discard_stale("STRING", "ACK_NEEDLE_LENGTH")
        self._transact(StringMessage("NEEDLE_LENGTH", text, header_version=self.header_version),
                       ("STRING", "ACK_NEEDLE_LENGTH"), "NEEDLE_LENGTH", check)
        self._event("needle_length", mm=v)

    def _check_workspace(self, t: RobotTarget, pose: np.ndarray):
        if self.workspace_mm is None:
            return
        robot_pose = np.linalg.inv(self.plan.calibration_matrix) @ pose
        lo, hi = self.workspace_mm
        p = robot_pose[:3, 3]
        if np.any(p < lo) or np.any(p > hi):
            out = float(np.linalg.norm(p - np.clip(p, lo, hi)))
            t.state = "unreachable"
            t.robot_status = f"{out:.1f} mm outside the robot workspace (checked before sending)"
            self._event("target_state", target=t.name, state=t.state, robot_status=t.robot_status)
            raise RobotBridgeError(f"Target {t.name} is {out:.1f} mm outside the robot workspace; it is not sent, "
                                   "re-plan it.")

    def send_target(self, name: str, *, confirm: bool = False) -> RobotTarget:
        """TGT_<id> for one target (needle pose, RAS). Every echo (also of re-sends) is checked against the
        pose computed here; STATUS TARGET and REACHABLE_TARGET must follow that echo; a reachable target's
        REACHABLE_TARGET must equal it. Records reachable / unreachable with the robot's STATUS text."""
        self._require_motion_allowed(f"sending target {name}", confirm)
        t = self.target(name)
        if t.state in ("reached", "sampled"):
            raise RobotBridgeError(f"Target {name} was already reached; it is not sent again.")
        with self._lock:
            pose = require_rigid(t.pose(), f"pose of target {name}")
            self._check_workspace(t, pose)
            if not t.target_id:
                t.target_id = self._new_id()
            tid = t.target_id
            meta = {"target_name": t.name, "region": t.region} if self.header_version == 2 else {}
            msg = TransformMessage(f"TGT_{tid}", pose, header_version=self.header_version, metadata=meta)
            if t.state == "planned":
                t.state = "sent"
            self._save_state()
            self._discard_stale("STATUS", "TARGET")
            self._discard_stale("TRANSFORM", "REACHABLE_TARGET")
            self.motion_possible = True
            seen = {}

            def record(dist, ang):
                t.echo_error_mm, t.echo_error_deg = round(dist, 4), round(ang, 4)

            def check(echo):
                try:
                    self._check_pose_echo(pose, echo, f"target {name}", record)
                finally:
                    self._save_state()
                seen.setdefault("seq", echo.arrival_seq)

            def send_once():
                _echo, attempts = self._transact(msg, ("TRANSFORM", f"ACK_{tid}"), f"target {name} (TGT_{tid})",
                                                 check)
                t.transmissions += attempts

            send_once()
            st = self._wait_reply("STATUS", "TARGET", seen["seq"], self.status_timeout_s, send_once, f"target {name}")
            reach = self._wait_reply("TRANSFORM", "REACHABLE_TARGET", seen["seq"], self.status_timeout_s, send_once,
                                     f"target {name}")
            problem = rigid_problem(reach.matrix)
            if problem:
                raise RobotBridgeError(f"The robot's REACHABLE_TARGET for {name} {problem}; do not move the robot, "
                                       "check its software.")
            t.reachable_ras = [round(float(v), 4) for v in reach.matrix[:3, 3]]
            t.robot_status = st.status_string
            if st.ok:
                dist, ang = pose_difference(pose, reach.matrix)
                if dist > self.tolerance_mm or ang > self.tolerance_deg:
                    self._event("reachable_mismatch", target=name, error_mm=dist, error_deg=ang)
                    self._save_state()
                    raise RobotBridgeError(
                        f"The robot reports target {name} reachable but its REACHABLE_TARGET is {dist:.2f} mm / "
                        f"{ang:.2f} deg from the target sent; do not move the robot, check its calibration.")
                t.state = "reachable"
            elif int(st.code) == StatusCode.CONFIG_ERROR and int(st.subcode) == UNREACHABLE_SUBCODE:
                t.state = "unreachable"
            else:
                self._save_state()
                raise RobotBridgeError(f"The robot refused target {name}: {st.status_string or 'no reason given'} "
                                       f"({_code_name(st.code)}); resolve this on the robot and retry.")
            self._event("target_state", target=name, state=t.state, robot_status=st.status_string)
            self._save_state()
            return t

    def _check_arrival(self, t: RobotTarget, pos: np.ndarray, what: str):
        problem = rigid_problem(pos)
        if problem:
            raise RobotBridgeError(f"The robot's CURRENT_POSITION {problem}; do not insert, check the robot.")
        dist, ang = pose_difference(t.pose(), pos)
        t.reached_error_mm = round(dist, 4)
        if dist > self.tolerance_mm or ang > self.tolerance_deg:
            self._save_state()
            raise RobotBridgeError(f"The robot reports {what} but its needle is {dist:.2f} mm / {ang:.2f} deg from "
                                   f"target {t.name}; do not insert, check the robot.")

    def move_to_target(self, name: str, *, confirm: bool = False) -> RobotTarget:
        """MOVE_TO_TARGET for a reachable target. smartbiopsy: waits for the robot's STATUS (target reached)
        and checks CURRENT_POSITION. brp: waits until the robot is in targeting position, enters
        MOVE_TO_TARGET (OK = ready to insert), then waits for HAS_REACHED_TARGET and checks CURRENT_POSITION."""
        self._require_motion_allowed(f"moving to target {name}", confirm)
        t = self.target(name)
        if t.state not in ("reachable", "in_position"):
            raise RobotBridgeError(f"Target {name} is {t.state}, not confirmed reachable by the robot; "
                                   f"send it first{' and review the plan' if t.state == 'unreachable' else ''}.")
        if self.profile == "brp":
            self.motion_possible = True
            self._poll_until(t, "IS_IN_TARGETING_POS", "targeting position")
            self.command("MOVE_TO_TARGET", confirm=True)
            t.state = "in_position"
            self._needle_out = True
            self._event("target_state", target=name, state="in_position")
            self._save_state()
            pos = self._poll_until(t, "HAS_REACHED_TARGET", "target reached")
        else:
            self.command("MOVE_TO_TARGET", confirm=True)
            pos = self.current_position()
        self._check_arrival(t, pos, "the target reached")
        t.state = "reached"
        self.motion_possible = False
        self._event("target_state", target=name, state="reached", error_mm=t.reached_error_mm)
        self._save_state()
        return t

    def _poll_until(self, t: RobotTarget, flag: str, what: str) -> np.ndarray:
        """brp: query CURRENT_POSITION until the robot's STRING ``flag`` is "1"; returns the position."""
        deadline = time.monotonic() + self.motion_timeout_s
        while True:
            if self._stop_sent:
                raise RobotBridgeError(f"STOP was sent while waiting for {what} of target {t.name}; the robot was "
                                       "stopped, check it before continuing.")
            pos, flags = self.query_position()
            if flags.get(flag) == "1":
                return pos
            if time.monotonic() >= deadline:
                raise RobotBridgeError(f"The robot did not report {what} for target {t.name} within "
                                       f"{self.motion_timeout_s:g} s; check the robot.")
            time.sleep(self.poll_period_s)

    def query_position(self, timeout: float | None = None) -> tuple[np.ndarray, dict]:
        """brp STRING query CURRENT_POSITION -> (4x4 pose RAS mm, {"IS_IN_TARGETING_POS": "0"/"1",
        "HAS_REACHED_TARGET": "0"/"1"}); every reply must arrive after the query."""
        timeout = self.status_timeout_s if timeout is None else timeout
        for _attempt in range(1 + self.retries):
            self._ensure_connected()
            marker = self.client.inbox.last_seq
            marker = max(marker, self._positions.last_seq)
            for dev in ("IS_IN_TARGETING_POS", "HAS_REACHED_TARGET"):
                self._discard_stale("STRING", dev)
            try:
                self.client.send(StringMessage("CURRENT_POSITION", "CURRENT_POSITION",
                                               header_version=self.header_version))
            except RobotBridgeError:
                continue
            pos = self._positions.get(lambda m: m.arrival_seq > marker, timeout / (1 + self.retries))
            if pos is None:
                continue
            flags = {}
            for dev in ("IS_IN_TARGETING_POS", "HAS_REACHED_TARGET"):
                m = self.client.receive(lambda x, d=dev: x.type_name == "STRING" and x.device_name == d
                                        and x.arrival_seq > marker, timeout=timeout / (1 + self.retries))
                if m is not None:
                    flags[dev] = m.text.strip()
            return pos.matrix, flags
        raise RobotBridgeError("The robot did not report CURRENT_POSITION; check the robot connection.")

    def retract_needle(self):
        """brp: STRING RETRACT_NEEDLE -> STATUS ACK_RETRACT_NEEDLE -> STATUS RETRACT_NEEDLE, then CURRENT_POSITION
        queries until the robot is back in targeting position with the needle out of the target (home)."""
        self.motion_possible = True
        self._discard_stale("STATUS", "ACK_RETRACT_NEEDLE")
        self._discard_stale("STATUS", "RETRACT_NEEDLE")
        seen = {}

        def check(ack):
            if not ack.ok:
                raise RobotBridgeError(f"The robot refused RETRACT_NEEDLE ({_code_name(ack.code)}); retract the needle "
                                       "at the robot.")
            seen.setdefault("seq", ack.arrival_seq)

        msg = StringMessage("RETRACT_NEEDLE", "RETRACT_NEEDLE", header_version=self.header_version)
        self._transact(msg, ("STATUS", "ACK_RETRACT_NEEDLE"), "RETRACT_NEEDLE", check)
        st = self._wait_reply("STATUS", "RETRACT_NEEDLE", seen["seq"], self.motion_timeout_s, None, "RETRACT_NEEDLE")
        if not st.ok:
            raise RobotBridgeError(f"The robot could not retract the needle: "
                                   f"{st.status_string or _code_name(st.code)}; retract it at the robot.")
        # a BRP robot answers RETRACT_NEEDLE OK when the retraction starts and refuses any transition (without a
        # reply) until the needle is home: wait until it reports the targeting position again, needle out of target
        deadline = time.monotonic() + self.motion_timeout_s
        while True:
            if self._stop_sent:
                raise RobotBridgeError("STOP was sent while the needle was retracting; check the robot before "
                                       "continuing.")
            _pos, flags = self.query_position()
            if flags.get("IS_IN_TARGETING_POS") == "1" and flags.get("HAS_REACHED_TARGET") == "0":
                break
            if time.monotonic() >= deadline:
                raise RobotBridgeError(f"The robot did not report the needle home within {self.motion_timeout_s:g} s "
                                       "after RETRACT_NEEDLE; check the robot.")
            time.sleep(self.poll_period_s)
        self._needle_out = False
        self.motion_possible = False
        self._event("needle_retracted")

    def send_needle_position(self, pose_ras) -> float:
        """brp: NPOS_<id> TRANSFORM (needle tip seen in the confirmation image, RAS mm) -> echo checked and
        STATUS MOVE_TO_TARGET; returns the echo error in mm."""
        pose = require_rigid(pose_ras, "needle position")
        nid = self._new_id()
        msg = TransformMessage(f"NPOS_{nid}", pose, header_version=self.header_version)
        seen = {}

        def check(echo):
            seen["dist"] = self._check_pose_echo(pose, echo, "the needle position")[0]
            seen.setdefault("seq", echo.arrival_seq)

        self._discard_stale("STATUS", "MOVE_TO_TARGET")
        self._transact(msg, ("TRANSFORM", f"ACK_{nid}"), f"needle position NPOS_{nid}", check)
        st = self._wait_reply("STATUS", "MOVE_TO_TARGET", seen["seq"], self.status_timeout_s, None, "NPOS")
        if not st.ok:
            raise RobotBridgeError(f"The robot refused the needle position ({_code_name(st.code)}).")
        return seen["dist"]

    def mark_sampled(self, name: str) -> RobotTarget:
        t = self.target(name)
        if t.state != "reached":
            raise RobotBridgeError(f"Target {name} is {t.state}; only a reached target can be marked sampled.")
        t.state = "sampled"
        self._event("target_state", target=name, state="sampled")
        self._save_state()
        return t

    def current_position(self, timeout: float | None = None) -> np.ndarray:
        """Current needle pose (RAS, mm): GET_TRANS query (smartbiopsy) or STRING query (brp)."""
        if self.profile == "brp":
            return self.query_position(timeout)[0]
        timeout = self.status_timeout_s if timeout is None else timeout
        for _attempt in range(1 + self.retries):
            self._ensure_connected()
            marker = max(self.client.inbox.last_seq, self._positions.last_seq)
            try:
                self.client.send(query_message("GET_TRANS", "CURRENT_POSITION", header_version=self.header_version))
            except RobotBridgeError:
                continue
            msg = self._positions.get(lambda m: m.arrival_seq > marker, timeout / (1 + self.retries))
            if msg is not None:
                return msg.matrix
        raise RobotBridgeError("The robot did not report CURRENT_POSITION; check the robot connection.")

    # -------------------------------------------------------------- whole session
    def run_plan(self, *, confirm: bool = False, progress=None, should_cancel=None) -> SessionResult:
        """START_UP (brp: + NEEDLE_LENGTH), CALIBRATION, PLANNING, then per target TARGETING -> TGT ->
        MOVE_TO_TARGET (brp: RETRACT_NEEDLE before the next TARGETING).

        Targets already reached (resumed state) are skipped; unreachable ones are reported, not moved to.
        Requires ``confirm=True``, the operator's plan confirmation, a passed registration QA and a robot
        calibration or the explicit CT statement."""
        if self.plan is None:
            raise RobotBridgeError("No plan is loaded; load the plan first.")
        self._require_motion_allowed("running the plan", confirm)
        if self.profile == "brp" and self.plan.needle_length_mm is None:
            raise RobotBridgeError("The brp robot needs the needle length; the plan names no needle, give "
                                   "--needle-length-mm.")
        steps = 3 + len(self.plan.targets)
        done = 0

        def report(msg):
            if progress:
                progress(min(1.0, done / steps), msg)

        def result(completed, cancelled=False):
            return SessionResult(self.plan.targets, completed, cancelled, str(self.log.path) if self.log else "",
                                 self.profile, self.plan.robot_frame)

        report("starting up")
        self.command("START_UP")
        if self.profile == "brp":
            self.send_needle_length(self.plan.needle_length_mm)
        done += 1
        report("calibrating")
        self.calibrate()
        done += 1
        self.command("PLANNING")
        done += 1
        for t in self.plan.targets:
            if should_cancel and should_cancel():
                self._event("cancelled")
                return result(False, True)
            report(f"target {t.name}")
            if t.state in ("reached", "sampled", "unreachable"):
                done += 1
                continue
            if not (self.profile == "brp" and self.phase == "TARGETING"):   # brp forbids TARGETING -> TARGETING
                self.command("TARGETING", confirm=True)
            self.send_target(t.name, confirm=True)
            if t.state == "reachable":
                self.move_to_target(t.name, confirm=True)
            done += 1
        report("done")
        return result(all(t.state in ("reached", "sampled") for t in self.plan.targets))

    # -------------------------------------------------------------- state file
    def _state_dict(self) -> dict:
        return {"tag": self.tag, "counter": self.counter, "profile": self.profile,
                "targets": [t.to_dict() for t in (self.plan.targets if self.plan else [])]}

    def _save_state(self):
        if not self.state_path or self.plan is None:
            return
        tmp = self.state_path.with_suffix(self.state_path.suffix + ".tmp")
        tmp.write_text(jsonio.dumps(self._state_dict(), with_reasons=True, indent=1, default=_json_default))
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

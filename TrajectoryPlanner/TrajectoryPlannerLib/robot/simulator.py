"""Robot simulator: the robot side of the workphase protocol (see :mod:`robot_protocol`) over OpenIGTLink.

State (phase, calibration, targets, needle pose) belongs to the simulator, not to a connection, so it
survives reconnects. Messages are recognised by id: a repeated ``CMD_<id>``, ``CLB_<id>`` or ``TGT_<id>``
is answered again from the stored replies and never acted on twice (``duplicates`` counts them).

Geometry: the calibration is robot base -> RAS (mm); the workspace is an axis-aligned box in the robot
frame (mm) and, optionally, a maximum needle angle (degrees) from the robot's insertion axis. Motion is
linear at ``speed_mm_s``; CURRENT_POSITION is pushed every ``position_period_s`` while moving (timers of
the event loop, not polling).

Faults (:class:`Fault`, command line ``--fault KIND[:key=value,...]``):

* ``drop_connection`` (``target=N`` or ``phase=P``): act on the message, then close the connection
  before replying.
* ``delay_ack`` (``phase=P`` or ``target=N``, ``delay=s``): send the acknowledgement late.
* ``missing_ack`` (``phase=P`` or ``target=N``): ignore the message as if it were lost.
* ``refuse`` (``phase=P``, ``code=13``): answer the phase STATUS with an error code.
* ``wrong_echo`` (``target=N``, ``offset_mm=5``): echo the target shifted along R.
* ``unreachable`` (``target=N``): STATUS TARGET CONFIG_ERROR subcode 3 (also when outside the workspace).

``count`` (default 1, -1 = always) says how many times a fault fires; ``target`` counts distinct
targets from 1 in order of arrival.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from TrajectoryPlannerLib.errors import RobotBridgeError
from TrajectoryPlannerLib.robot.codec import StatusCode, StatusMessage, StringMessage, TransformMessage
from TrajectoryPlannerLib.robot.transport import IgtlServer
from TrajectoryPlannerLib.robot.protocol import PHASES, UNREACHABLE_SUBCODE, SessionLog

logger = logging.getLogger(__name__)

FAULT_KINDS = ("drop_connection", "delay_ack", "missing_ack", "refuse", "wrong_echo", "unreachable")


@dataclass
class Fault:
    """One injected fault; see the module docstring for kinds and keys."""

    kind: str
    phase: str | None = None
    target: int | None = None
    count: int = 1
    delay_s: float = 0.5
    offset_mm: float = 5.0
    code: int = StatusCode.NOT_READY
    fired: int = 0

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise RobotBridgeError(f"Unknown fault {self.kind!r}; use one of {', '.join(FAULT_KINDS)}.")
        if self.phase is not None:
            self.phase = self.phase.upper()
            if self.phase not in PHASES:
                raise RobotBridgeError(f"Fault phase {self.phase} is not a workphase; use one of {', '.join(PHASES)}.")

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        """``kind[:key=value,...]`` with keys phase, target, count, delay, offset_mm, code."""
        kind, _, rest = spec.partition(":")
        kw: dict = {}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep:
                raise RobotBridgeError(f"Fault option {item!r} must be key=value (e.g. target=2).")
            try:
                if key == "phase":
                    kw["phase"] = value.strip()
                elif key in ("target", "count", "code"):
                    kw[key] = int(value)
                elif key in ("delay", "delay_s"):
                    kw["delay_s"] = float(value)
                elif key == "offset_mm":
                    kw["offset_mm"] = float(value)
                else:
                    raise RobotBridgeError(f"Unknown fault option {key!r}; use phase, target, count, delay, "
                                           "offset_mm or code.")
            except ValueError as exc:
                raise RobotBridgeError(f"Fault option {item!r} needs a number.") from exc
        return cls(kind.strip(), **kw)

    def applies(self, kind: str, phase: str | None = None, target: int | None = None) -> bool:
        if self.kind != kind or (self.count >= 0 and self.fired >= self.count):
            return False
        if self.phase is not None and self.phase != phase:
            return False
        if self.target is not None and self.target != target:
            return False
        return True


@dataclass
class Workspace:
    """Reachable region in the robot frame: box bounds in mm, optional max needle angle (deg) from ``axis``."""

    lower_mm: tuple = (-150.0, -150.0, -250.0)
    upper_mm: tuple = (150.0, 150.0, 250.0)
    max_angle_deg: float | None = None
    axis: tuple = (0.0, 0.0, 1.0)

    def check(self, pose_robot: np.ndarray) -> tuple[bool, str, np.ndarray]:
        """(reachable, reason, nearest reachable point in the robot frame)."""
        p = pose_robot[:3, 3]
        lo, hi = np.asarray(self.lower_mm, float), np.asarray(self.upper_mm, float)
        clamped = np.clip(p, lo, hi)
        if np.any(p != clamped):
            out = float(np.linalg.norm(p - clamped))
            return False, f"target is {out:.1f} mm outside the robot workspace", clamped
        if self.max_angle_deg is not None:
            d = pose_robot[:3, 2] / np.linalg.norm(pose_robot[:3, 2])
            a = np.asarray(self.axis, float) / np.linalg.norm(self.axis)
            ang = float(np.degrees(np.arccos(np.clip(abs(d @ a), -1.0, 1.0))))
            if ang > self.max_angle_deg:
                return False, f"needle angle {ang:.1f} deg exceeds the robot's {self.max_angle_deg:g} deg limit", p
        return True, "target reachable", p


@dataclass
class SimTarget:
    target_id: str
    ordinal: int
    pose_ras: np.ndarray
    reachable: bool
    reason: str
    receipts: int = 1


class RobotSimulator:
    """OpenIGTLink robot on ``host:port`` (127.0.0.1, free port when 0). Use ``start()``/``stop()`` or ``with``."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", *, faults=(), workspace: Workspace | None = None,
                 speed_mm_s: float = 200.0, position_period_s: float = 0.02, home_ras=(0.0, 0.0, 0.0),
                 log_path=None):
        self.host, self.requested_port = host, int(port)
        self.faults = [f if isinstance(f, Fault) else Fault.parse(f) for f in faults]
        self.workspace = workspace or Workspace()
        self.speed_mm_s = float(speed_mm_s)
        self.position_period_s = float(position_period_s)
        self.log = SessionLog(log_path) if log_path else None
        self.phase: str | None = None
        self.emergency_latched = False
        self.calibration: np.ndarray | None = None
        self.position = np.eye(4)
        self.position[:3, 3] = home_ras
        self.targets: dict[str, SimTarget] = {}
        self.current_target: str | None = None
        self.replies: dict[str, list] = {}      # id -> stored replies for duplicates
        self.duplicates: dict[str, int] = {}
        self.commands: list[tuple[str, str]] = []  # (id, phase) acted on, in order
        self.connections_seen = 0
        self.server: IgtlServer | None = None
        self._motion = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "RobotSimulator":
        self.server = IgtlServer(self.requested_port, self.host, on_message=self._on_message,
                                 on_connect=self._on_connect, on_sent=self._on_sent, name="robot-sim")
        logger.info("Robot simulator listening on %s:%d", self.host, self.server.port)
        return self

    @property
    def port(self) -> int:
        return self.server.port if self.server else self.requested_port

    @property
    def rejections(self):
        return self.server.rejections if self.server else []

    def stop(self):
        if self.server:
            self.server.stop()
        if self.log:
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _on_connect(self, conn):
        self.connections_seen += 1

    def _on_sent(self, conn, msg):
        if self.log:
            self.log.message("sent", msg)

    # ------------------------------------------------------------ helpers
    def _fault(self, kind, phase=None, target=None) -> Fault | None:
        for f in self.faults:
            if f.applies(kind, phase, target):
                f.fired += 1
                logger.info("robot-sim: injecting %s (phase=%s target=%s)", kind, phase, target)
                return f
        return None

    def _send(self, conn, msgs):
        for m in msgs:
            try:
                conn.send(m)
            except RobotBridgeError:
                return

    def _broadcast(self, msg):
        self.server.broadcast(msg)

    def _reply(self, conn, key, msgs, *, phase=None, target=None):
        """Store replies for duplicates, then send them (late, dropped or not at all if a fault says so)."""
        self.replies[key] = list(msgs)
        if self._fault("drop_connection", phase, target):
            conn.close("simulated dropped connection")
            return
        f = self._fault("delay_ack", phase, target)
        if f:
            self.server.loop.call_later(f.delay_s, self._send, conn, msgs)
            return
        self._send(conn, msgs)

    def _status(self, device, code=StatusCode.OK, text="", subcode=0, error_name=""):
        return StatusMessage(device, code=code, subcode=subcode, error_name=error_name, status_string=text)

    # ------------------------------------------------------------ protocol
    def _on_message(self, conn, msg):
        if self.log:
            self.log.message("received", msg)
        dev = msg.device_name
        if msg.type_name == "STRING" and dev.startswith("CMD_"):
            self._on_command(conn, dev[4:], msg.text.strip().upper())
        elif msg.type_name == "TRANSFORM" and dev.startswith("CLB_"):
            self._on_calibration(conn, dev[4:], msg)
        elif msg.type_name == "TRANSFORM" and dev.startswith("TGT_"):
            self._on_target(conn, dev[4:], msg)
        elif msg.type_name == "GET_TRANS" and dev in ("CURRENT_POSITION", ""):
            self._send(conn, [TransformMessage("CURRENT_POSITION", self.position)])
        else:
            logger.info("robot-sim: ignoring %s %s", msg.type_name, dev)

    def _duplicate(self, conn, key) -> bool:
        if key not in self.replies:
            return False
        self.duplicates[key] = self.duplicates.get(key, 0) + 1
        logger.info("robot-sim: %s received again; re-sending the stored answer", key)
        self._send(conn, self.replies[key])
        return True

    def _on_command(self, conn, cid, phase):
        key = f"CMD_{cid}"
        if self._duplicate(conn, key):
            return
        if self._fault("missing_ack", phase=phase):
            return
        ack = StringMessage(f"ACK_{cid}", phase)
        self.commands.append((cid, phase))
        if phase not in PHASES:
            st = self._status("CMD", StatusCode.UNKNOWN_INSTRUCTION, f"unknown workphase {phase[:60]!r}")
            self._reply(conn, key, [ack, st], phase=phase)
            return
        f = self._fault("refuse", phase=phase)
        if f:
            st = self._status(phase, f.code, f"{phase} refused by the robot (simulated refusal)")
            self._reply(conn, key, [ack, st], phase=phase)
            return
        st = self._enter_phase(phase, key)
        self._reply(conn, key, [ack] + ([st] if st is not None else []), phase=phase)

    def _enter_phase(self, phase, key) -> StatusMessage | None:
        """New phase; returns the STATUS to send now (None: sent later, e.g. at the end of motion)."""
        if phase in ("STOP", "EMERGENCY"):
            self._halt(f"motion halted by {phase}")
            self.phase = phase
            self.emergency_latched = self.emergency_latched or phase == "EMERGENCY"
            return self._status(phase, text="robot halted")
        if self.emergency_latched and phase != "START_UP":
            return self._status(phase, StatusCode.NOT_READY, "robot is in EMERGENCY; send START_UP first")
        if phase == "START_UP":
            self.emergency_latched = False
            self.phase = phase
            return self._status(phase, text="robot initialised")
        if self.phase is None:
            return self._status(phase, StatusCode.NOT_READY, "robot not started; send START_UP first")
        if phase == "CALIBRATION":
            self.phase = phase
            return None  # STATUS follows the CLB transform
        if phase in ("PLANNING", "TARGETING") and self.calibration is None:
            return self._status(phase, StatusCode.NOT_READY, "robot not calibrated; run CALIBRATION first")
        if phase == "MOVE_TO_TARGET":
            t = self.targets.get(self.current_target) if self.current_target else None
            if self.phase != "TARGETING" or t is None:
                return self._status(phase, StatusCode.NOT_READY, "no target received in TARGETING")
            if not t.reachable:
                return self._status(phase, StatusCode.CONFIG_ERROR, f"current target unreachable: {t.reason}",
                                    UNREACHABLE_SUBCODE)
            self.phase = phase
            self._start_motion(t.pose_ras, key)
            return None
        self.phase = phase
        return self._status(phase, text=f"{phase} entered")

    def _on_calibration(self, conn, cid, msg):
        key = f"CLB_{cid}"
        if self._duplicate(conn, key):
            return
        echo = TransformMessage(f"ACK_{cid}", msg.matrix)
        if self.phase != "CALIBRATION":
            self._reply(conn, key, [echo, self._status("CALIBRATION", StatusCode.NOT_READY,
                                                       "not in CALIBRATION; send CMD CALIBRATION first")])
            return
        if abs(np.linalg.det(msg.matrix[:3, :3])) < 1e-6:
            self._reply(conn, key, [echo, self._status("CALIBRATION", StatusCode.CONFIG_ERROR,
                                                       "calibration matrix is singular")])
            return
        self.calibration = msg.matrix.copy()
        self._reply(conn, key, [echo, self._status("CALIBRATION", text="calibration received")])

    def _on_target(self, conn, tid, msg):
        key = f"TGT_{tid}"
        if key in self.replies:
            self.targets[key].receipts += 1
            self.current_target = key
            self._duplicate(conn, key)
            return
        ordinal = len(self.targets) + 1
        if self._fault("missing_ack", target=ordinal):
            return
        if self.phase != "TARGETING" or self.calibration is None:
            self._send(conn, [TransformMessage(f"ACK_{tid}", msg.matrix),
                              self._status("TARGET", StatusCode.NOT_READY, "not in TARGETING; send TARGETING first")])
            return
        pose = msg.matrix.copy()
        robot_from_ras = np.linalg.inv(self.calibration)
        ok, reason, nearest_robot = self.workspace.check(robot_from_ras @ pose)
        if ok and self._fault("unreachable", target=ordinal):
            ok, reason = False, "target outside the needle guide's reach (simulated)"
            nearest_robot = (robot_from_ras @ pose)[:3, 3] + np.array([0.0, 0.0, 20.0])
        t = SimTarget(key, ordinal, pose, ok, reason)
        self.targets[key] = t
        self.current_target = key
        echo_pose = pose.copy()
        f = self._fault("wrong_echo", target=ordinal)
        if f:
            echo_pose[0, 3] += f.offset_mm
        reach = np.eye(4)
        reach[:3, :3] = pose[:3, :3]
        reach[:3, 3] = (self.calibration @ np.append(nearest_robot, 1.0))[:3]
        if ok:
            st = self._status("TARGET", text=f"target {ordinal} reachable")
        else:
            st = self._status("TARGET", StatusCode.CONFIG_ERROR, f"target {ordinal} unreachable: {reason}",
                              UNREACHABLE_SUBCODE, "UNREACHABLE")
        self._reply(conn, key, [TransformMessage(f"ACK_{tid}", echo_pose), st,
                                TransformMessage("REACHABLE_TARGET", reach)], target=ordinal)

    # ------------------------------------------------------------ motion
    def _start_motion(self, goal: np.ndarray, key: str):
        self._halt("new motion")
        start = self.position.copy()
        dist = float(np.linalg.norm(goal[:3, 3] - start[:3, 3]))
        duration = dist / self.speed_mm_s if self.speed_mm_s > 0 else 0.0
        steps = max(1, int(np.ceil(duration / self.position_period_s))) if duration > 0 else 1
        state = {"i": 0, "handle": None, "key": key}
        self._motion = state

        def step():
            if self._motion is not state:
                return
            state["i"] += 1
            frac = min(1.0, state["i"] / steps)
            pos = goal.copy()
            pos[:3, 3] = start[:3, 3] + frac * (goal[:3, 3] - start[:3, 3])
            self.position = pos
            self._broadcast(TransformMessage("CURRENT_POSITION", pos))
            if frac >= 1.0:
                self._motion = None
                st = self._status("MOVE_TO_TARGET", text="target reached")
                self.replies[key] = self.replies.get(key, [])[:1] + [st]
                self._broadcast(st)
                return
            state["handle"] = self.server.loop.call_later(self.position_period_s, step)

        state["handle"] = self.server.loop.call_later(min(self.position_period_s, duration), step)

    def _halt(self, reason):
        m = self._motion
        if m is not None:
            self.server.loop.cancel(m["handle"])
            self._motion = None
            st = self._status("MOVE_TO_TARGET", StatusCode.DISABLED, reason)
            self.replies[m["key"]] = self.replies.get(m["key"], [])[:1] + [st]
            self._broadcast(st)

    def summary(self) -> dict:
        return {"phase": self.phase, "targets": {k: {"ordinal": t.ordinal, "reachable": t.reachable,
                                                     "receipts": t.receipts} for k, t in self.targets.items()},
                "duplicates": dict(self.duplicates), "commands": list(self.commands)}

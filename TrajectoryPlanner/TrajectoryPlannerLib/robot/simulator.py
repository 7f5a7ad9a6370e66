"""Robot simulator: the robot side of the workphase protocol (see :mod:`protocol`) over OpenIGTLink.

Two profiles (``profile=``): ``smartbiopsy`` (this project's order) and ``brp`` (ProstateBRP's
BRPRobotComm order and meaning: ACK -> STATUS CURRENT_STATUS -> STATUS <phase>, alignment in TARGETING,
MOVE_TO_TARGET OK = in targeting position then insertion, STRING queries CURRENT_POSITION /
IS_IN_TARGETING_POS / HAS_REACHED_TARGET, RETRACT_NEEDLE, NEEDLE_LENGTH, NPOS; forbidden transitions are
not answered). Simulated robot only: for the demo and tests.

State (phase, calibration, targets, needle pose) belongs to the simulator, not to a connection, so it
survives reconnects. Messages are recognised by id: a repeated ``CMD_<id>``, ``CLB_<id>`` or ``TGT_<id>``
is answered again from the stored replies and never acted on twice (``duplicates`` counts them). Per-id
state is bounded (the newest ``max_ids`` ids are remembered).

Observers: every other connection (e.g. Slicer's OpenIGTLinkIF watching the session) receives the
statuses, the accepted target (TRANSFORM ``TARGET``), ``REACHABLE_TARGET``, ``CALIBRATION`` and
``CURRENT_POSITION`` under these fixed names; acknowledgements (``ACK_<id>``) go only to the sender.

Geometry: the calibration is robot base -> RAS (mm) and must be rigid; target poses must be rigid
(rotation orthonormal within 1e-3, determinant +1); the workspace is an axis-aligned box in the robot
frame (mm) and, optionally, a maximum needle angle (degrees) from the robot's insertion axis. Motion is
linear at ``speed_mm_s``; CURRENT_POSITION is pushed every ``position_period_s`` while moving (timers of
the event loop, not polling).

Faults (:class:`Fault`, command line ``--fault KIND[:key=value,...]``):

* ``drop_connection`` (``target=N`` or ``phase=P``, ``after=0``): act on the message, send the first
  ``after`` reply messages (e.g. 1 = the acknowledgement only), then close the connection.
* ``delay_ack`` (``phase=P`` or ``target=N``, ``delay=s``): send the acknowledgement late.
* ``missing_ack`` (``phase=P`` or ``target=N``): ignore the message as if it were lost.
* ``refuse`` (``phase=P``, ``code=13``): answer the phase STATUS with an error code.
* ``wrong_echo`` (``target=N`` or ``phase=CALIBRATION``, ``offset_mm=5``, ``rotate_deg=0``,
  ``resend=1``): echo the target (or calibration) shifted along R and/or rotated about S; with
  ``resend=1`` only the answer to a re-sent message is wrong.
* ``bad_rotation`` (``target=N``): echo the target with an all-zero rotation.
* ``wrong_reachable`` (``target=N``, ``offset_mm=5``): STATUS TARGET OK but REACHABLE_TARGET shifted.
* ``stale_status`` (``phase=CALIBRATION``): the CLB transform is refused with CONFIG_ERROR, and a stale
  STATUS CALIBRATION OK is sent just before its echo.
* ``malformed`` (``phase=P`` or ``target=N``): send a malformed v2 message (1-byte metadata header)
  before the reply.
* ``unreachable`` (``target=N``): STATUS TARGET CONFIG_ERROR subcode 3 (also when outside the workspace).

``count`` (default 1, -1 = always) says how many times a fault fires; ``target`` counts distinct
targets from 1 in order of arrival.
"""
from __future__ import annotations

import collections
import logging
import struct
from dataclasses import dataclass

import numpy as np

from TrajectoryPlannerLib.errors import RobotBridgeError
from TrajectoryPlannerLib.robot.calibration_io import rigid_problem
from TrajectoryPlannerLib.robot.codec import StatusCode, StatusMessage, StringMessage, TransformMessage, crc64
from TrajectoryPlannerLib.robot.transport import IgtlServer
from TrajectoryPlannerLib.robot.protocol import PHASES, PROFILES, UNREACHABLE_SUBCODE, SessionLog

logger = logging.getLogger(__name__)

FAULT_KINDS = ("drop_connection", "delay_ack", "missing_ack", "refuse", "wrong_echo", "bad_rotation",
               "wrong_reachable", "stale_status", "malformed", "unreachable")
#: Phases a brp robot refuses (does not answer) from each phase, as in BRPRobotComm.
BRP_FORBIDDEN = {None: {"PLANNING", "TARGETING", "MOVE_TO_TARGET", "CALIBRATION"},
                 "START_UP": {"START_UP", "PLANNING", "TARGETING", "MOVE_TO_TARGET"},
                 "CALIBRATION": {"CALIBRATION", "TARGETING", "MOVE_TO_TARGET"},
                 "TARGETING": {"TARGETING"}}


@dataclass
class Fault:
    """One injected fault; see the module docstring for kinds and keys."""

    kind: str
    phase: str | None = None
    target: int | None = None
    count: int = 1
    delay_s: float = 0.5
    offset_mm: float = 5.0
    rotate_deg: float = 0.0
    resend: int = 0
    after: int = 0
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
        """``kind[:key=value,...]`` with keys phase, target, count, delay, offset_mm, rotate_deg, resend, after,
        code."""
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
                elif key in ("target", "count", "code", "resend", "after"):
                    kw[key] = int(value)
                elif key in ("delay", "delay_s"):
                    kw["delay_s"] = float(value)
                elif key in ("offset_mm", "rotate_deg"):
                    kw[key] = float(value)
                else:
                    raise RobotBridgeError(f"Unknown fault option {key!r}; use phase, target, count, delay, "
                                           "offset_mm, rotate_deg, resend, after or code.")
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


def _rot_z(deg: float) -> np.ndarray:
    a = np.radians(deg)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return r


def malformed_v2_message(device: str = "MALFORMED") -> bytes:
    """A STRING v2 message whose metadata header is 1 byte long (CRC valid): it must be dropped, not wedge."""
    content = struct.pack(">HH", 3, 1) + b"x"
    body = struct.pack(">HHII", 12, 1, 0, 0) + content + b"\x00"
    header = struct.pack(">H12s20sQQQ", 2, b"STRING", device.encode().ljust(20, b"\0"), 0, len(body), crc64(body))
    return header + body


class RobotSimulator:
    """OpenIGTLink robot on ``host:port`` (127.0.0.1, free port when 0). Use ``start()``/``stop()`` or ``with``."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", *, faults=(), workspace: Workspace | None = None,
                 speed_mm_s: float = 200.0, position_period_s: float = 0.02, home_ras=(0.0, 0.0, 0.0),
                 log_path=None, profile: str = "smartbiopsy", max_ids: int = 256, max_connections: int = 8,
                 idle_timeout_s: float | None = 300.0):
        if profile not in PROFILES:
            raise RobotBridgeError(f"Robot protocol profile {profile!r} is unknown; use one of {', '.join(PROFILES)}.")
        self.profile = profile
        self.host, self.requested_port = host, int(port)
        self.faults = [f if isinstance(f, Fault) else Fault.parse(f) for f in faults]
        self.workspace = workspace or Workspace()
        self.speed_mm_s = float(speed_mm_s)
        self.position_period_s = float(position_period_s)
        self.log = SessionLog(log_path) if log_path else None
        self.max_ids = int(max_ids)
        self.max_connections = int(max_connections)
        self.idle_timeout_s = idle_timeout_s
        self.phase: str | None = None
        self.emergency_latched = False
        self.calibration: np.ndarray | None = None
        self.position = np.eye(4)
        self.position[:3, 3] = home_ras
        self.targets: collections.OrderedDict[str, SimTarget] = collections.OrderedDict()
        self.target_count = 0
        self.current_target: str | None = None
        self.replies: collections.OrderedDict[str, list] = collections.OrderedDict()  # id -> stored replies
        self.duplicates: dict[str, int] = {}
        self.commands: list[tuple[str, str]] = []  # (id, phase) acted on, in order (newest 10 * max_ids)
        self.connections_seen = 0
        self.needle_length_mm: float | None = None
        self.in_targeting_pos = False
        self.has_reached_target = False
        self.needle_home = True
        self._refuse_next_calibration = False
        self.server: IgtlServer | None = None
        self._motion = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "RobotSimulator":
        self.server = IgtlServer(self.requested_port, self.host, on_message=self._on_message,
                                 on_connect=self._on_connect, on_sent=self._on_sent, name="robot-sim",
                                 max_connections=self.max_connections, idle_timeout_s=self.idle_timeout_s)
        logger.info("Robot simulator (%s profile, simulated) listening on %s:%d", self.profile, self.host,
                    self.server.port)
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
                if isinstance(m, bytes):
                    conn.send_bytes(m)
                else:
                    conn.send(m)
            except RobotBridgeError:
                return

    def _broadcast(self, msg):
        self.server.broadcast(msg)

    def _observe(self, conn, msgs):
        """Show observers (every other connection) what happened, under fixed device names."""
        out = [m for m in msgs if isinstance(m, (StatusMessage, TransformMessage))
               and not m.device_name.startswith(("ACK_", "CMD_", "TGT_", "CLB_", "NPOS_"))]
        if not out:
            return
        for other in list(self.server.connections):
            if other is not conn:
                self._send(other, out)

    def _remember(self, key, msgs):
        self.replies[key] = list(msgs)
        self.replies.move_to_end(key)
        while len(self.replies) > self.max_ids:
            old, _ = self.replies.popitem(last=False)
            self.duplicates.pop(old, None)
            self.targets.pop(old, None)

    def _reply(self, conn, key, msgs, *, phase=None, target=None, observe=()):
        """Store replies for duplicates, then send them (late, dropped or not at all if a fault says so)."""
        self._remember(key, msgs)
        self._observe(conn, list(msgs) + list(observe))
        if self._fault("malformed", phase, target):
            self._send(conn, [malformed_v2_message()])
        f = self._fault("drop_connection", phase, target)
        if f:
            self._send(conn, list(msgs)[:f.after])
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
        elif msg.type_name == "GET_TRANS" and dev in ("CURRENT_POSITION", "") and self.profile == "smartbiopsy":
            self._send(conn, [TransformMessage("CURRENT_POSITION", self.position)])
        elif self.profile == "brp" and msg.type_name == "STRING" and dev == "CURRENT_POSITION":
            self._send(conn, [TransformMessage("CURRENT_POSITION", self.position),
                              StringMessage("IS_IN_TARGETING_POS", "1" if self.in_targeting_pos else "0"),
                              StringMessage("HAS_REACHED_TARGET", "1" if self.has_reached_target else "0")])
        elif self.profile == "brp" and msg.type_name == "STRING" and dev == "CURRENT_STATUS":
            self._send(conn, [self._status(self.phase or "UNDEFINED")])
        elif (self.profile == "brp" and msg.type_name == "STRING" and dev == "NEEDLE_LENGTH"
              and self.phase == "START_UP"):
            try:
                length = float(msg.text)
            except ValueError:
                length = float("nan")
            if np.isfinite(length) and length > 0:
                self.needle_length_mm = length
            self._send(conn, [StringMessage("ACK_NEEDLE_LENGTH", msg.text)])
        elif self.profile == "brp" and msg.type_name == "STRING" and dev == "RETRACT_NEEDLE" \
                and self.phase == "MOVE_TO_TARGET":
            self._send(conn, [self._status("ACK_RETRACT_NEEDLE")])
            self._retract()
            self._send(conn, [self._status("RETRACT_NEEDLE")])
        elif self.profile == "brp" and msg.type_name == "TRANSFORM" and dev.startswith("NPOS_") \
                and self.phase == "MOVE_TO_TARGET":
            self._send(conn, [TransformMessage(f"ACK_{dev[5:]}", msg.matrix), self._status("MOVE_TO_TARGET")])
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
        if self.profile == "brp" and phase in PHASES and not self._brp_allowed(phase):
            logger.info("robot-sim: transition %s -> %s is not allowed; not answered", self.phase, phase)
            return
        ack = StringMessage(f"ACK_{cid}", phase)
        self.commands.append((cid, phase))
        del self.commands[:-10 * self.max_ids]
        if phase not in PHASES:
            st = self._status("CMD", StatusCode.UNKNOWN_INSTRUCTION, f"unknown workphase {phase[:60]!r}")
            self._reply(conn, key, [ack, st], phase=phase)
            return
        f = self._fault("refuse", phase=phase)
        if f:
            st = self._status(phase, f.code, f"{phase} refused by the robot (simulated refusal)")
            self._reply(conn, key, [ack] + self._entry(phase) + [st], phase=phase)
            return
        st = self._enter_phase(phase, key)
        extra = []
        if self.profile == "brp" and phase == "MOVE_TO_TARGET":
            extra = [TransformMessage("CURRENT_POSITION", self.position)]
        if phase == "CALIBRATION" and self._fault("stale_status", phase=phase):
            self._refuse_next_calibration = True
        self._reply(conn, key, [ack] + (self._entry(phase) if st is not None or self.profile == "brp" else [])
                    + ([st] if st is not None else []) + extra, phase=phase)

    def _entry(self, phase) -> list:
        """brp: STATUS CURRENT_STATUS (OK, error name = the phase) between the ACK and the phase STATUS."""
        if self.profile != "brp":
            return []
        return [self._status("CURRENT_STATUS", error_name=phase)]

    def _brp_allowed(self, phase) -> bool:
        if phase in ("STOP", "EMERGENCY"):
            return True
        if self.phase == "MOVE_TO_TARGET" and not self.needle_home:
            return False
        return phase not in BRP_FORBIDDEN.get(self.phase, set())

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
            if self.profile == "brp":
                return self._status(phase, text="CALIBRATION entered")
            return None  # STATUS follows the CLB transform
        if phase in ("PLANNING", "TARGETING") and self.calibration is None:
            code = StatusCode.ACCESS_DENIED if self.profile == "brp" else StatusCode.NOT_READY
            return self._status(phase, code, "robot not calibrated; run CALIBRATION first")
        if phase == "MOVE_TO_TARGET":
            t = self.targets.get(self.current_target) if self.current_target else None
            if self.profile == "brp":
                if t is None or not t.reachable or not self.in_targeting_pos:
                    return self._status(phase, StatusCode.NOT_READY, "not in targeting position")
                self.phase = phase
                self._insert(t.pose_ras)
                return self._status(phase, text="in targeting position, ready to insert")
            if self.phase != "TARGETING" or t is None:
                return self._status(phase, StatusCode.NOT_READY, "no target received in TARGETING")
            if not t.reachable:
                return self._status(phase, StatusCode.CONFIG_ERROR, f"current target unreachable: {t.reason}",
                                    UNREACHABLE_SUBCODE)
            self.phase = phase
            self._start_motion(t.pose_ras, key)
            return None
        if phase == "TARGETING":
            self.in_targeting_pos = False
            self.has_reached_target = False
        self.phase = phase
        return self._status(phase, text=f"{phase} entered")

    def _on_calibration(self, conn, cid, msg):
        key = f"CLB_{cid}"
        if self._duplicate(conn, key):
            return
        matrix = msg.matrix
        f = self._fault("wrong_echo", phase="CALIBRATION")
        echo_m = matrix.copy()
        if f:
            echo_m = echo_m @ _rot_z(f.rotate_deg)
            echo_m[0, 3] += f.offset_mm
        echo = TransformMessage(f"ACK_{cid}", echo_m)
        reach = [TransformMessage("REACHABLE_TARGET", self.position)] if self.profile == "brp" else []
        if self.phase != "CALIBRATION":
            self._reply(conn, key, [echo, self._status("CALIBRATION", StatusCode.NOT_READY,
                                                       "not in CALIBRATION; send CMD CALIBRATION first")])
            return
        problem = rigid_problem(matrix)
        if problem or self._refuse_next_calibration:
            stale = []
            if self._refuse_next_calibration:   # an OK left over from before, sent ahead of the echo
                stale = [self._status("CALIBRATION", text="stale status (simulated fault)")]
            self._refuse_next_calibration = False
            refusal = self._status("CALIBRATION", StatusCode.CONFIG_ERROR,
                                   f"calibration matrix {problem or 'rejected (simulated)'}")
            self._reply(conn, key, stale + [echo, refusal])
            return
        self.calibration = matrix.copy()
        self._reply(conn, key, [echo] + reach + [self._status("CALIBRATION", text="calibration received")],
                    observe=[TransformMessage("CALIBRATION", matrix)])

    def _on_target(self, conn, tid, msg):
        key = f"TGT_{tid}"
        if key in self.replies:
            if key in self.targets:
                self.targets[key].receipts += 1
                self.current_target = key
            f = self._fault("wrong_echo", target=self.targets[key].ordinal if key in self.targets else None)
            if f and f.resend:
                self.duplicates[key] = self.duplicates.get(key, 0) + 1
                bad = [m for m in self.replies[key]]
                e = bad[0].matrix.copy() @ _rot_z(f.rotate_deg)
                e[0, 3] += f.offset_mm
                self._send(conn, [TransformMessage(bad[0].device_name, e)] + bad[1:])
                return
            self._duplicate(conn, key)
            return
        ordinal = self.target_count + 1
        if self._fault("missing_ack", target=ordinal):
            return
        if self.phase != "TARGETING" or self.calibration is None:
            self._send(conn, [TransformMessage(f"ACK_{tid}", msg.matrix),
                              self._status("TARGET", StatusCode.NOT_READY, "not in TARGETING; send TARGETING first")])
            return
        self.target_count = ordinal
        pose = msg.matrix.copy()
        problem = rigid_problem(pose)
        if problem:
            self._reply(conn, key, [TransformMessage(f"ACK_{tid}", pose),
                                    self._status("TARGET", StatusCode.CONFIG_ERROR, f"invalid target matrix: {problem}",
                                                 1, "INVALID_MATRIX")], target=ordinal)
            return
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
        if f and f.resend:
            f.fired -= 1   # fires on the re-send only
        elif f:
            echo_pose = echo_pose @ _rot_z(f.rotate_deg)
            echo_pose[0, 3] += f.offset_mm
        if self._fault("bad_rotation", target=ordinal):
            echo_pose[:3, :3] = 0.0
        reach = np.eye(4)
        reach[:3, :3] = pose[:3, :3]
        reach[:3, 3] = (self.calibration @ np.append(nearest_robot, 1.0))[:3]
        f = self._fault("wrong_reachable", target=ordinal)
        if f:
            reach[0, 3] += f.offset_mm
        if ok:
            st = self._status("TARGET", text=f"target {ordinal} reachable")
        else:
            st = self._status("TARGET", StatusCode.CONFIG_ERROR, f"target {ordinal} unreachable: {reason}",
                              UNREACHABLE_SUBCODE, "UNREACHABLE")
        self._reply(conn, key, [TransformMessage(f"ACK_{tid}", echo_pose), st,
                                TransformMessage("REACHABLE_TARGET", reach)], target=ordinal,
                    observe=[TransformMessage("TARGET", pose)])
        if ok and self.profile == "brp":
            self._align(pose)

    # ------------------------------------------------------------ motion
    def _approach_pose(self, goal: np.ndarray) -> np.ndarray:
        """brp targeting position: needle aligned with the path, tip one needle length before the target."""
        p = goal.copy()
        p[:3, 3] = goal[:3, 3] - (self.needle_length_mm or 100.0) * goal[:3, 2]
        return p

    def _align(self, goal):
        self.in_targeting_pos = self.has_reached_target = False
        self.needle_home = True

        def done():
            self.in_targeting_pos = True
        self._start_motion(self._approach_pose(goal), None, on_done=done)

    def _insert(self, goal):
        self.needle_home = False

        def done():
            self.has_reached_target = True
        self._start_motion(goal, None, on_done=done)

    def _retract(self):
        t = self.targets.get(self.current_target) if self.current_target else None
        self.has_reached_target = False
        self.in_targeting_pos = False
        if t is None:
            self.needle_home = True
            return

        def done():
            self.needle_home = True
            self.in_targeting_pos = True
        self._start_motion(self._approach_pose(t.pose_ras), None, on_done=done)

    def _start_motion(self, goal: np.ndarray, key: str | None, on_done=None):
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
                if on_done is not None:
                    on_done()
                if key is not None:
                    st = self._status("MOVE_TO_TARGET", text="target reached")
                    if key in self.replies:
                        self.replies[key] = self.replies[key][:1] + [st]
                    self._broadcast(st)
                return
            state["handle"] = self.server.loop.call_later(self.position_period_s, step)

        state["handle"] = self.server.loop.call_later(min(self.position_period_s, duration), step)

    def _halt(self, reason):
        m = self._motion
        if m is not None:
            self.server.loop.cancel(m["handle"])
            self._motion = None
            if m["key"] is not None:
                st = self._status("MOVE_TO_TARGET", StatusCode.DISABLED, reason)
                if m["key"] in self.replies:
                    self.replies[m["key"]] = self.replies[m["key"]][:1] + [st]
                self._broadcast(st)

    @property
    def moving(self) -> bool:
        return self._motion is not None

    def summary(self) -> dict:
        return {"profile": self.profile, "phase": self.phase,
                "targets": {k: {"ordinal": t.ordinal, "reachable": t.reachable, "receipts": t.receipts}
                            for k, t in self.targets.items()},
                "duplicates": dict(self.duplicates), "commands": list(self.commands), "moving": self.moving}

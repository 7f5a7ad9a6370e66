"""Robot commands: ``smartbiopsy robot-sim`` (robot simulator) and ``smartbiopsy robot-send`` (send a plan).

``robot-sim --port N [--host 127.0.0.1] [--fault KIND[:key=value,...]] ... [--duration S]``
    Runs the OpenIGTLink robot simulator until interrupted (or for ``--duration`` seconds). Prints
    ``robot-sim listening on HOST:PORT`` first (``--port 0`` picks a free port). Faults: see
    ``TrajectoryPlannerLib.robot.simulator`` (drop_connection, delay_ack, missing_ack, refuse, wrong_echo,
    unreachable), e.g. ``--fault unreachable:target=3 --fault delay_ack:phase=START_UP,delay=0.3``.

``robot-send --host H --port N --plan plan.json --confirm [--log session.jsonl] [--state state.json]``
    Runs the robot session for the plan: START_UP, CALIBRATION, PLANNING, then for each target
    TARGETING, TGT (echo checked), MOVE_TO_TARGET. Refuses without ``--confirm`` (the operator's
    confirmation of the plan) and when the plan's registration QA did not pass. Prints a JSON summary.
    Exit 0 when every target was reached, 3 when the robot reported a target unreachable (its STATUS
    text is printed), 2 on an error.

plan.json (written by the planner)::

    {"trajectories": [{"name": "A", "region": "A", "entry_ras": [x, y, z], "target_ras": [x, y, z], ...}],
     "registration_qa": {"passed": true, ...},
     "calibration_matrix": [[...4x4...]]}      # optional, robot base -> RAS (mm); identity by default

One to three trajectories, RAS coordinates in mm; other keys are ignored.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("robot-sim", help="run the OpenIGTLink needle-guidance robot simulator",
                              description="Robot side of the workphase protocol with workspace limits, motion time "
                                          "and injected faults. Binds 127.0.0.1 unless --host is given.")
    p.add_argument("--port", type=int, required=True, help="TCP port (0 = any free port; 18944 is the usual)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--fault", action="append", default=[], metavar="KIND[:key=value,...]",
                   help="inject a fault (repeatable): drop_connection, delay_ack, missing_ack, refuse, wrong_echo, "
                        "unreachable; keys phase=, target=, count=, delay=, offset_mm=, code=")
    p.add_argument("--workspace", default=None, metavar="XMIN,XMAX,YMIN,YMAX,ZMIN,ZMAX",
                   help="workspace box in the robot frame, mm (default -150,150,-150,150,-250,250)")
    p.add_argument("--max-angle-deg", type=float, default=None, help="largest needle angle from the robot z axis")
    p.add_argument("--speed", type=float, default=200.0, help="needle guide speed, mm/s (default 200)")
    p.add_argument("--log", default=None, help="JSON Lines log of every message (optional)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: run until "
                                                                 "interrupted)")
    p.set_defaults(func=run, robot_command="sim")

    s = subparsers.add_parser("robot-send", help="send a confirmed plan to the robot over OpenIGTLink",
                              description="Run the robot session for a plan (three targets at most). Nothing is sent "
                                          "without --confirm and a passed registration QA.")
    s.add_argument("--host", default="127.0.0.1", help="robot address (default 127.0.0.1)")
    s.add_argument("--port", type=int, required=True, help="robot OpenIGTLink port")
    s.add_argument("--plan", required=True, help="plan.json from the planner")
    s.add_argument("--confirm", action="store_true", help="the operator reviewed and confirms the plan")
    s.add_argument("--operator", default="operator", help="name recorded with the confirmation")
    s.add_argument("--log", default=None, help="session log (JSON Lines; default <plan>.robot.jsonl)")
    s.add_argument("--state", default=None, help="session state file; an existing one is resumed")
    s.add_argument("--ack-timeout", type=float, default=1.0, help="seconds to wait for each acknowledgement")
    s.add_argument("--retries", type=int, default=2, help="extra attempts per acknowledgement (default 2)")
    s.add_argument("--motion-timeout", type=float, default=120.0, help="seconds to wait for a move to finish")
    s.add_argument("--tolerance-mm", type=float, default=0.5, help="echo/position tolerance, mm (default 0.5)")
    s.add_argument("--tolerance-deg", type=float, default=0.5, help="echo rotation tolerance, degrees (default 0.5)")
    s.add_argument("--header-version", type=int, choices=(1, 2), default=1, help="OpenIGTLink header version")
    s.set_defaults(func=run, robot_command="send")


def run(args) -> int:
    return run_sim(args) if args.robot_command == "sim" else run_send(args)


def run_sim(args) -> int:
    from TrajectoryPlannerLib.errors import RobotBridgeError
    from TrajectoryPlannerLib.robot.simulator import RobotSimulator, Workspace

    if not 0 <= args.port <= 65535:
        raise RobotBridgeError(f"--port {args.port} is not a TCP port; use 0-65535.")
    ws = Workspace(max_angle_deg=args.max_angle_deg)
    if args.workspace:
        try:
            v = [float(x) for x in args.workspace.split(",")]
        except ValueError as exc:
            raise RobotBridgeError("--workspace needs six numbers XMIN,XMAX,YMIN,YMAX,ZMIN,ZMAX in mm.") from exc
        if len(v) != 6 or v[0] >= v[1] or v[2] >= v[3] or v[4] >= v[5]:
            raise RobotBridgeError("--workspace needs six numbers XMIN,XMAX,YMIN,YMAX,ZMIN,ZMAX in mm with min < max.")
        ws.lower_mm, ws.upper_mm = (v[0], v[2], v[4]), (v[1], v[3], v[5])
    if args.speed <= 0:
        raise RobotBridgeError("--speed must be positive (mm/s).")
    sim = RobotSimulator(args.port, args.host, faults=args.fault, workspace=ws, speed_mm_s=args.speed,
                         log_path=args.log)
    stop = threading.Event()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
        except ValueError:  # not in the main thread
            pass
    sim.start()
    try:
        print(f"robot-sim listening on {sim.host}:{sim.port}", flush=True)
        stop.wait(args.duration)
    finally:
        sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps({"robot_sim": sim.summary(), "rejected": [r.to_dict() for r in sim.rejections]}), flush=True)
    return 0


def run_send(args) -> int:
    from SmartBiopsyLib.cli.main import ProgressBar
    from TrajectoryPlannerLib.errors import RobotBridgeError
    from TrajectoryPlannerLib.robot.protocol import RobotPlan, RobotSession

    plan_path = Path(args.plan)
    plan = RobotPlan.load(plan_path)
    if not args.confirm:
        raise RobotBridgeError("robot-send can move the robot: review the plan and rerun with --confirm.")
    if not plan.registration_qa_passed:
        raise RobotBridgeError("The plan's registration QA did not pass; review or redo the registration before "
                               "sending targets to the robot.")
    log_path = Path(args.log) if args.log else plan_path.with_suffix(".robot.jsonl")
    session = RobotSession(args.host, args.port, log_path=log_path, state_path=args.state,
                           ack_timeout_s=args.ack_timeout, retries=args.retries, motion_timeout_s=args.motion_timeout,
                           tolerance_mm=args.tolerance_mm, tolerance_deg=args.tolerance_deg,
                           header_version=args.header_version)
    try:
        session.connect()
        session.load_plan(plan)
        session.confirm_plan(args.operator)
        result = session.run_plan(confirm=True, progress=ProgressBar("robot"))
    finally:
        session.close()
    unreachable = [t for t in result.targets if t.state == "unreachable"]
    for t in unreachable:
        print(f"target {t.name} unreachable: {t.robot_status}", file=sys.stderr)
    print(json.dumps(result.to_dict()))
    return 3 if unreachable else 0

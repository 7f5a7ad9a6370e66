"""Robot commands: ``smartbiopsy robot-sim`` (robot simulator) and ``smartbiopsy robot-send`` (send a plan).

``robot-sim --port N [--host 127.0.0.1] [--profile smartbiopsy|brp] [--fault KIND[:key=value,...]] ...``
    Runs the OpenIGTLink robot simulator (simulated robot, for the demo and tests) until interrupted (or
    for ``--duration`` seconds). Prints ``robot-sim listening on HOST:PORT`` first (``--port 0`` picks a
    free port). Faults: see ``TrajectoryPlannerLib.robot.simulator``.

``robot-send --port N --plan plan.json (--calibration robot_calibration.json | --robot-frame ct) --confirm``
    Runs the robot session for the planner's plan.json: by default the best-ranked path per target,
    ``--paths A-1,B-2,C-1`` to choose (ambiguous input is refused with the list of choices). Refuses
    before connecting without ``--confirm``, without a registration QA that passed strictly (the plan's
    ``registration_qa`` or ``--registration-qa qa.json``: JSON true and the predicted error at every target
    within its threshold), and without a robot calibration (``smartbiopsy.robot_calibration/1``) or the
    explicit statement ``--robot-frame ct`` (logged). ``--profile smartbiopsy|brp`` chooses the protocol
    (written in the session log). On SIGINT, SIGTERM or any error while the robot may be moving, STOP
    is sent and its acknowledgement awaited (``--stop-timeout`` s) before exiting. Prints a JSON summary.
    Exit 0 when every target was reached, 3 when the robot reported a target unreachable (its STATUS text
    is printed), 2 on an error, 130 when interrupted.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from SmartBiopsyCoreLib.dataio import jsonio


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

    p.add_argument("--profile", choices=("smartbiopsy", "brp"), default="smartbiopsy",
                   help="protocol: smartbiopsy (default) or brp (ProstateBRP BRPRobotComm order and meaning)")
    p.add_argument("--max-connections", type=int, default=8, help="simultaneous clients (default 8)")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="close a silent client after this many s")
    p.set_defaults(func=run, robot_command="sim")

    s = subparsers.add_parser("robot-send", help="send a confirmed plan to the robot over OpenIGTLink",
                              description="Run the robot session for the planner's plan (three targets at most). "
                                          "Nothing is sent without --confirm, a strictly passed registration QA and "
                                          "a robot calibration file or --robot-frame ct.")
    s.add_argument("--host", default="127.0.0.1", help="robot address (default 127.0.0.1)")
    s.add_argument("--port", type=int, required=True, help="robot OpenIGTLink port")
    s.add_argument("--plan", required=True, help="plan.json from the planner")
    s.add_argument("--paths", default=None, metavar="A-1,B-2,C-1",
                   help="paths to send, one per target (default: the best-ranked path per target)")
    s.add_argument("--registration-qa", default=None, metavar="qa.json",
                   help="the registration's qa.json (default: the plan's registration_qa)")
    s.add_argument("--calibration", default=None, metavar="robot_calibration.json",
                   help="robot base -> CT RAS calibration (smartbiopsy.robot_calibration/1)")
    s.add_argument("--robot-frame", choices=("ct",), default=None,
                   help="state explicitly that the robot works in CT RAS coordinates (no calibration; logged)")
    s.add_argument("--profile", choices=("smartbiopsy", "brp"), default="smartbiopsy",
                   help="robot protocol (default smartbiopsy; brp = ProstateBRP BRPRobotComm)")
    s.add_argument("--needle-length-mm", type=float, default=None,
                   help="needle length sent to a brp robot (default: the plan's core needle usable length)")
    s.add_argument("--confirm", action="store_true", help="the operator reviewed and confirms the plan")
    s.add_argument("--operator", default="operator", help="name recorded with the confirmation")
    s.add_argument("--log", default=None, help="session log (JSON Lines; default <plan>.robot.jsonl)")
    s.add_argument("--state", default=None, help="session state file; an existing one is resumed")
    s.add_argument("--ack-timeout", type=float, default=1.0, help="seconds to wait for each acknowledgement")
    s.add_argument("--retries", type=int, default=2, help="extra attempts per acknowledgement (default 2)")
    s.add_argument("--motion-timeout", type=float, default=120.0, help="seconds to wait for a move to finish")
    s.add_argument("--stop-timeout", type=float, default=2.0,
                   help="seconds to wait for the acknowledgement of the STOP sent on interrupt or error")
    s.add_argument("--tolerance-mm", type=float, default=0.5, help="echo/position tolerance, mm (default 0.5)")
    s.add_argument("--tolerance-deg", type=float, default=0.5, help="echo rotation tolerance, degrees (default 0.5)")
    s.add_argument("--workspace", default=None, metavar="XMIN,XMAX,YMIN,YMAX,ZMIN,ZMAX",
                   help="robot workspace box in the robot frame, mm; targets outside are not sent")
    s.add_argument("--header-version", type=int, choices=(1, 2), default=1, help="OpenIGTLink header version")
    s.set_defaults(func=run, robot_command="send")


def _box(text, what):
    from TrajectoryPlannerLib.errors import RobotBridgeError

    try:
        v = [float(x) for x in text.split(",")]
    except ValueError as exc:
        raise RobotBridgeError(f"{what} needs six numbers XMIN,XMAX,YMIN,YMAX,ZMIN,ZMAX in mm.") from exc
    if len(v) != 6 or not (v[0] < v[1] and v[2] < v[3] and v[4] < v[5]):
        raise RobotBridgeError(f"{what} needs six numbers XMIN,XMAX,YMIN,YMAX,ZMIN,ZMAX in mm with min < max.")
    return (v[0], v[2], v[4]), (v[1], v[3], v[5])


def run(args) -> int:
    return run_sim(args) if args.robot_command == "sim" else run_send(args)


def run_sim(args) -> int:
    from TrajectoryPlannerLib.errors import RobotBridgeError
    from TrajectoryPlannerLib.robot.simulator import RobotSimulator, Workspace

    if not 0 <= args.port <= 65535:
        raise RobotBridgeError(f"--port {args.port} is not a TCP port; use 0-65535.")
    ws = Workspace(max_angle_deg=args.max_angle_deg)
    if args.workspace:
        ws.lower_mm, ws.upper_mm = _box(args.workspace, "--workspace")
    if args.speed <= 0:
        raise RobotBridgeError("--speed must be positive (mm/s).")
    sim = RobotSimulator(args.port, args.host, faults=args.fault, workspace=ws, speed_mm_s=args.speed,
                         log_path=args.log, profile=args.profile, max_connections=args.max_connections,
                         idle_timeout_s=args.idle_timeout if args.idle_timeout > 0 else None)
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
    print(jsonio.dumps({"robot_sim": sim.summary(), "rejected": [r.to_dict() for r in sim.rejections]}), flush=True)
    return 0


def run_send(args) -> int:
    from SmartBiopsyLib.cli.main import ProgressBar
    from TrajectoryPlannerLib.errors import RobotBridgeError
    from TrajectoryPlannerLib.robot.calibration_io import load_robot_calibration
    from TrajectoryPlannerLib.robot.protocol import RobotPlan, RobotSession

    plan_path = Path(args.plan)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()] if args.paths else None
    plan = RobotPlan.load(plan_path, paths, args.registration_qa)
    if not args.confirm:
        raise RobotBridgeError("robot-send can move the robot: review the plan and rerun with --confirm.")
    if plan.registration_qa_problem:
        raise RobotBridgeError(f"The registration QA does not allow targeting: {plan.registration_qa_problem}; review "
                               "or redo the registration before sending targets to the robot.")
    if args.calibration and args.robot_frame:
        raise RobotBridgeError("Give either --calibration or --robot-frame ct, not both.")
    if args.calibration:
        plan.use_calibration(load_robot_calibration(args.calibration))
    elif args.robot_frame == "ct":
        plan.state_robot_frame_ct(f"{args.operator} (robot-send --robot-frame ct)")
    else:
        raise RobotBridgeError("There is no robot calibration: give --calibration robot_calibration.json, or state "
                               "with --robot-frame ct that the robot works in CT coordinates.")
    if args.needle_length_mm is not None:
        plan.needle_length_mm = args.needle_length_mm
    if args.profile == "brp" and not (plan.needle_length_mm and plan.needle_length_mm > 0):
        raise RobotBridgeError("The brp robot needs the needle length; give --needle-length-mm.")
    workspace = _box(args.workspace, "--workspace") if args.workspace else None
    log_path = Path(args.log) if args.log else plan_path.with_suffix(".robot.jsonl")
    session = RobotSession(args.host, args.port, log_path=log_path, state_path=args.state,
                           ack_timeout_s=args.ack_timeout, retries=args.retries, motion_timeout_s=args.motion_timeout,
                           tolerance_mm=args.tolerance_mm, tolerance_deg=args.tolerance_deg,
                           header_version=args.header_version, profile=args.profile, workspace_mm=workspace)

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, interrupted)
        except ValueError:  # not in the main thread
            pass
    try:
        session.connect()
        session.load_plan(plan)
        session.confirm_plan(args.operator)
        result = session.run_plan(confirm=True, progress=ProgressBar("robot"))
    except BaseException:
        # SIGINT, SIGTERM or any error while the robot may be moving: STOP first, then report
        if session.motion_possible:
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            ok = session.emergency_stop(args.stop_timeout)
            print("STOP sent to the robot and acknowledged" if ok else
                  "STOP sent to the robot but NOT acknowledged: stop the robot at its console", file=sys.stderr)
        raise
    finally:
        try:
            session.close(stop_if_moving=True, stop_timeout_s=args.stop_timeout)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    unreachable = [t for t in result.targets if t.state == "unreachable"]
    for t in unreachable:
        print(f"target {t.name} unreachable: {t.robot_status}", file=sys.stderr)
    print(jsonio.dumps(result.to_dict()))
    return 3 if unreachable else 0

"""Errors of planning and of the robot bridge; the message is shown to the user as is."""


class TrajectoryPlannerError(Exception):
    """Base: planning cannot proceed (message says which constraint or input is the cause)."""


class RobotBridgeError(TrajectoryPlannerError):
    """The robot session cannot proceed (refusal, timeout, disconnect, mismatch)."""

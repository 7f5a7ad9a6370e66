"""Errors of planning and of the robot bridge; the message is shown to the user as is."""
from SmartBiopsyCoreLib.errors import SmartBiopsyError


class TrajectoryPlannerError(SmartBiopsyError):
    """Base: planning cannot proceed (message says which constraint or input is the cause)."""


class RobotBridgeError(TrajectoryPlannerError):
    """The robot session cannot proceed (refusal, timeout, disconnect, mismatch)."""

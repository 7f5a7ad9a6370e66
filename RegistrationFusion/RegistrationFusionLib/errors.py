"""Errors of the registration/fusion step; the message is shown to the user as is."""
from SmartBiopsyCoreLib.errors import SmartBiopsyError


class RegistrationFusionError(SmartBiopsyError):
    """Base: capsule detection, matching, registration or QA cannot proceed (message says why)."""

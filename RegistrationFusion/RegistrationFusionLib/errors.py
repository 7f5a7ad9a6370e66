"""Errors of the registration/fusion step; the message is shown to the user as is."""


class RegistrationFusionError(Exception):
    """Base: capsule detection, matching, registration or QA cannot proceed (message says why)."""

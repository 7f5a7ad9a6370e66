"""Errors a user can act on. The message is one sentence for a radiologist or physicist, never a trace."""


class SmartBiopsyError(Exception):
    """Base for every SmartBiopsy error whose message is shown to the user as is."""


class InputDataError(SmartBiopsyError):
    """Input data is missing, empty, corrupt, truncated, mismatched or in the wrong units."""

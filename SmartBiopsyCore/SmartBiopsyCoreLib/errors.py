"""Errors a user can act on. The message is one sentence for a radiologist or physicist, never a trace.

Every SmartBiopsy library raises subclasses of :class:`SmartBiopsyError` (the one base): the command line,
the workflow and the Slicer modules show its message as is and treat anything else as an unexpected failure.
"""


class SmartBiopsyError(Exception):
    """Base for every SmartBiopsy error whose message is shown to the user as is."""


class InputDataError(SmartBiopsyError):
    """Input data is missing, empty, corrupt, truncated, mismatched or in the wrong units."""


class CancelledError(SmartBiopsyError):
    """The user cancelled a long operation (``should_cancel()`` returned true); nothing was changed."""

"""The progress/cancel protocol of every long SmartBiopsy operation.

A long function takes two optional keyword callbacks: ``progress(fraction, message)`` with a fraction in
[0, 1] and a short sentence, and ``should_cancel() -> bool``, polled between steps. The Slicer widget turns
them into a progress dialog, the command line into a progress bar. Cancelling raises
:class:`~SmartBiopsyCoreLib.errors.CancelledError`, whose message says what was (not) changed.
"""
from __future__ import annotations

from typing import Callable, Optional

from SmartBiopsyCoreLib.errors import CancelledError

ProgressCallback = Optional[Callable[[float, str], None]]
CancelCallback = Optional[Callable[[], bool]]


def report(progress: ProgressCallback, fraction: float, message: str = "") -> None:
    """Call ``progress(fraction, message)`` when a callback was given."""
    if progress is not None:
        progress(float(fraction), message)


def check_cancel(should_cancel: CancelCallback, what: str = "the operation") -> None:
    """Raise CancelledError("<what> was cancelled by the user; nothing was changed") when asked to stop."""
    if should_cancel is not None and should_cancel():
        raise CancelledError(f"{what} was cancelled by the user; nothing was changed")

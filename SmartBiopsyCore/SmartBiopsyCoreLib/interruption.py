"""Ctrl-C (SIGINT) that is honoured everywhere, also inside long SimpleITK/ITK calls, and never mistaken for
an error of the data.

The command line installs :func:`install_sigint_handler`. On Ctrl-C the handler records the interruption
(:func:`interrupted` turns true) and raises ``KeyboardInterrupt`` as Python's default handler does; a plain
SimpleITK filter polls for it and stops with that ``KeyboardInterrupt``.

A SimpleITK registration (``ImageRegistrationMethod``) does not poll (its ``Abort()`` does not stop the
optimiser either), and an exception raised inside one of its Python commands is printed as a traceback by
SimpleITK and comes back as a ``RuntimeError``. So a registration runs inside :func:`abort_itk_on_interrupt`:
a Python command on every iteration lets the handler run; the handler's ``KeyboardInterrupt`` ends the
optimiser, SimpleITK's traceback print goes to a sink instead of the console, and leaving the block raises
:class:`Interrupted`. Code that
catches ``RuntimeError`` from ITK (to turn it into one sentence for the user) calls
:func:`raise_if_interrupted` first, so an interruption is never reported as "the registration failed".
Long Python loops stop at their next progress or ``should_cancel`` call (:func:`interruptible`).

Inside Slicer nothing is installed: the flag stays false and these functions do nothing.
"""
from __future__ import annotations

import io
import signal
import sys
import threading
from contextlib import contextmanager

_FLAG = threading.Event()
_ITK_DEPTH = [0]  # > 0 while an abortable ITK call runs (main thread)
_STDERR = [None]  # the console stream while SimpleITK's traceback print goes to a sink

#: the one line the command line prints when interrupted (exit code 130)
INTERRUPTED_MESSAGE = "interrupted; outputs written so far are kept"


class Interrupted(KeyboardInterrupt):
    """The user pressed Ctrl-C; raised where an interruption surfaced as another exception (e.g. from ITK)."""


def _handler(signum, frame):  # noqa: ARG001 - signal handler signature
    _FLAG.set()
    _raise()


def _raise():
    if _ITK_DEPTH[0] > 0 and _STDERR[0] is None:
        # inside an ITK command: SimpleITK prints the exception before turning it into a RuntimeError
        _STDERR[0], sys.stderr = sys.stderr, io.StringIO()
    raise Interrupted()


def install_sigint_handler() -> bool:
    """Install the recording SIGINT handler (main thread only); returns whether it was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGINT, _handler)
    return True


def interrupted() -> bool:
    """True once Ctrl-C was pressed in this process (after :func:`install_sigint_handler`)."""
    return _FLAG.is_set()


def mark_interrupted() -> None:
    """Record an interruption that arrived as a bare ``KeyboardInterrupt`` (e.g. before the handler)."""
    _FLAG.set()


def reset() -> None:
    """Forget a recorded interruption (tests)."""
    _FLAG.clear()


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` when Ctrl-C was pressed; call it before converting an ITK error to a message."""
    if _FLAG.is_set():
        raise Interrupted()


@contextmanager
def abort_itk_on_interrupt(process_object):
    """Run a SimpleITK ``Execute`` of ``process_object`` (a registration method or filter) so that Ctrl-C stops
    it at its next iteration/progress event and raises :class:`Interrupted` when the block ends, without a
    traceback from inside ITK. Add the object's own commands before entering (``RemoveAllCommands`` drops this
    one)."""
    import SimpleITK as sitk

    def poll():  # Python runs here at every event, so a pending SIGINT handler runs too
        if _FLAG.is_set():
            _raise()

    for event in (sitk.sitkIterationEvent, sitk.sitkProgressEvent):
        process_object.AddCommand(event, poll)
    _ITK_DEPTH[0] += 1
    try:
        yield
    finally:
        _ITK_DEPTH[0] -= 1
        if _STDERR[0] is not None and _ITK_DEPTH[0] == 0:
            sys.stderr, _STDERR[0] = _STDERR[0], None
        if _FLAG.is_set():
            raise Interrupted()


def interruptible(callback):
    """``callback`` (progress or should_cancel) that first raises :class:`Interrupted` after Ctrl-C."""
    if callback is None:
        return None

    def wrapped(*args, **kwargs):
        raise_if_interrupted()
        return callback(*args, **kwargs)

    return wrapped

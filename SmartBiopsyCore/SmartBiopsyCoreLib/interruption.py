"""Ctrl-C (SIGINT) that is honoured everywhere, also inside long SimpleITK/ITK calls, and never mistaken for
an error of the data.

The command line installs :func:`install_sigint_handler`. On Ctrl-C the handler records the interruption
(:func:`interrupted` turns true) and raises ``KeyboardInterrupt`` as Python's default handler does; a plain
SimpleITK filter polls for it and stops with that ``KeyboardInterrupt``.

A SimpleITK registration (``ImageRegistrationMethod``) does not poll (its ``Abort()`` does not stop the
optimiser either), spends seconds in its image pyramids without any event, and an exception raised inside one
of its Python commands is printed as a traceback by SimpleITK and comes back as a ``RuntimeError``. So the
project's registrations call :func:`run_itk`: ITK runs in a worker thread, the main thread stays responsive
and raises :class:`Interrupted` at once, and the worker's ITK call ends at its next event (its traceback
print goes to a sink). Code that catches ``RuntimeError`` from ITK (to turn it into one sentence for the
user) calls :func:`raise_if_interrupted` first, so an interruption is never reported as "the registration
failed". Long Python loops stop at their next progress or ``should_cancel`` call (:func:`interruptible`).

Inside Slicer nothing is installed: the flag stays false and these functions do nothing.
"""
from __future__ import annotations

import io
import signal
import sys
import threading

_FLAG = threading.Event()
_ITK_DEPTH = [0]  # > 0 while an abortable ITK call runs (main thread)
_STDERR = [None]  # the console stream while SimpleITK's traceback print goes to a sink
_INSTALLED = [False]  # the command line's handler is installed (ITK then runs in a worker thread)
_WORKERS: list = []   # ITK worker threads (a process must not end while one is inside ITK)

#: the one line the command line prints when interrupted (exit code 130)
INTERRUPTED_MESSAGE = "interrupted; outputs written so far are kept"


class Interrupted(KeyboardInterrupt):
    """The user pressed Ctrl-C; raised where an interruption surfaced as another exception (e.g. from ITK)."""


def _handler(signum, frame):  # noqa: ARG001 - signal handler signature
    _FLAG.set()
    _raise()


def _raise():
    if _ITK_DEPTH[0] > 0 and _STDERR[0] is None:
        # an ITK call is running: SimpleITK prints an exception from its command before it returns
        _STDERR[0], sys.stderr = sys.stderr, io.StringIO()
    raise Interrupted()


def install_sigint_handler():
    """Install the recording SIGINT handler (main thread only); returns the previous handler (for
    :func:`restore_sigint_handler`) or None when not installed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGINT, lambda signum, frame: _handler(signum, frame))
    _INSTALLED[0] = True
    return previous


def restore_sigint_handler(previous) -> None:
    """Put back the handler :func:`install_sigint_handler` replaced (a command run inside a longer process)."""
    if previous is None or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, previous)
    _INSTALLED[0] = False


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


def run_itk(process_object, *inputs):
    """``process_object.Execute(*inputs)`` (a SimpleITK registration method or filter) that Ctrl-C stops at once.

    With the command line's handler installed, ITK runs in a worker thread (SimpleITK releases the GIL) while
    the main thread waits in short steps, so the handler runs within a fraction of a second even while ITK
    builds its image pyramids without any event; :class:`Interrupted` is raised then, and a Python command on
    every iteration/progress event stops the worker's ITK call at its next event. SimpleITK's traceback print
    of that stop goes to a sink, never to the console. Without the handler (Slicer, tests in process) this is
    a plain ``Execute`` in the calling thread. Add the object's own commands before calling."""
    if not _INSTALLED[0] or threading.current_thread() is not threading.main_thread():
        return process_object.Execute(*inputs)
    import SimpleITK as sitk

    raise_if_interrupted()

    def poll():  # in the worker: a pending interruption ends the ITK call at this event
        if _FLAG.is_set():
            _raise()

    for event in (sitk.sitkIterationEvent, sitk.sitkProgressEvent):
        process_object.AddCommand(event, poll)
    box: dict = {}

    def work():
        try:
            box["value"] = process_object.Execute(*inputs)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread as is
            box["error"] = exc

    worker = threading.Thread(target=work, name="smartbiopsy-itk", daemon=True)
    _WORKERS.append(worker)
    _ITK_DEPTH[0] += 1
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.05)  # the main thread stays where Python runs signal handlers
    finally:
        _ITK_DEPTH[0] -= 1
        if not worker.is_alive() and _STDERR[0] is not None and _ITK_DEPTH[0] == 0:
            sys.stderr, _STDERR[0] = _STDERR[0], None  # else the still-running worker may print: keep the sink
    raise_if_interrupted()
    if "error" in box:
        raise box["error"]
    return box["value"]


def itk_worker_interrupted() -> bool:
    """True when Ctrl-C stopped an ITK call running in a worker thread. Such a process must end with
    ``os._exit``: ITK's thread pool, stopped in the middle of a step, aborts a normal interpreter exit in C++
    ("terminate called without an active exception")."""
    return _FLAG.is_set() and bool(_WORKERS)


def console_stream():
    """The console's stderr (the real one while SimpleITK's traceback print is sent to a sink)."""
    return _STDERR[0] if _STDERR[0] is not None else sys.stderr


def interruptible(callback):
    """``callback`` (progress or should_cancel) that first raises :class:`Interrupted` after Ctrl-C."""
    if callback is None:
        return None

    def wrapped(*args, **kwargs):
        raise_if_interrupted()
        return callback(*args, **kwargs)

    return wrapped

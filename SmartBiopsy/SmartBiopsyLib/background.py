"""Work of the workflow run in a child process, so that it overlaps with the steps that follow.

Pure-Python work (pydicom and highdicom for the hospital export, matplotlib for the report figures) holds the
interpreter lock, so a thread would not overlap it with anything; a child process does. On Linux the child is
forked: it starts at once with every module already imported (ITK's thread pool, OpenBLAS and Python's logging
re-initialise themselves in a forked child); elsewhere it is started with ``spawn`` (a fresh interpreter that
imports what it needs; its arguments are pickled). Ctrl-C is blocked in the child: the terminal sends it to the
whole process group, and the parent (the command line's handler) decides and ends the child itself. Inside the Slicer application, or with ``SMARTBIOPSY_SERIAL=1``, nothing is started and
the workflow does the work in its own process, in order (:func:`process_allowed`).
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

#: Seconds a released child may take to answer before it is ended and the step does the work itself (a child
#: forked from a multi-threaded process could in principle hang; the work then costs time, never correctness).
CHILD_ANSWER_TIMEOUT_S = 600.0


def process_allowed() -> bool:
    """True when work may go to a worker: not inside the Slicer application (whose executable is not a plain
    Python), not switched off with ``SMARTBIOPSY_SERIAL=1``, and on the main thread (the only one that can block
    Ctrl-C for a child's start)."""
    if os.environ.get("SMARTBIOPSY_SERIAL", "") not in ("", "0"):
        return False
    slicer = sys.modules.get("slicer")
    if slicer is not None and getattr(slicer, "app", None) is not None:
        return False
    return threading.current_thread() is threading.main_thread()


class _Collect(logging.Handler):
    """Log records of the child, sent back to the parent (its run.log) as (logger name, level, message)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list = []

    def emit(self, record):
        try:
            self.records.append((record.name, record.levelno, record.getMessage()))
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is dropped, as logging does
            pass


class _Stop(BaseException):
    """The parent will not use the result (or is gone): the child ends without an answer."""


def _child(conn, target: str, args: tuple, gated: bool) -> None:
    """Child process: ``module:function`` called with ``args`` (and ``wait_for_go`` when ``gated``), then
    (status, value, log records) through ``conn``."""
    handler = _Collect()
    root = logging.getLogger()
    for h in list(root.handlers):  # a forked child inherits the parent's console and run.log handlers
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)  # Python warnings (e.g. highdicom's) go to the parent's log, not to the console

    def wait_for_go():
        try:
            go = conn.recv()
        except (EOFError, OSError):
            go = None
        if go != "go":
            raise _Stop()

    try:
        module, name = target.split(":")
        func = getattr(importlib.import_module(module), name)
        value = func(*args, wait_for_go=wait_for_go) if gated else func(*args)
        conn.send(("done", value, handler.records))
    except _Stop:
        pass
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which does the work itself then
        try:
            conn.send(("crashed", f"{type(exc).__name__}: {exc}", handler.records))
        except (OSError, ValueError):
            pass
    finally:
        conn.close()


class ChildJob:
    """``module:function(*args)`` running in a child process that writes into ``outputs`` (paths).

    ``gated``: the function also gets ``wait_for_go``, a callable that returns once the parent called
    :meth:`release` (e.g. when what it reads next is written). :meth:`result` releases it and waits for its
    value; :meth:`cancel` ends it and removes ``outputs``."""

    def __init__(self, target: str, args: tuple, outputs=(), gated: bool = False, name: str = "job"):
        import multiprocessing
        import signal

        self.name = name
        self.outputs = [Path(p) for p in outputs]
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._released = not gated
        self._proc = ctx.Process(target=_child, args=(child_conn, target, tuple(args), gated),
                                 name=f"smartbiopsy-{name}", daemon=True)
        # Ctrl-C blocked while the child starts (the mask is inherited through fork and exec); a Ctrl-C pressed
        # meanwhile is pending and arrives in the parent on unblock
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        child_conn.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def release(self) -> None:
        """Let a gated child go on (what it reads next is written now)."""
        if not self._released:
            self._released = True
            try:
                self._conn.send("go")
            except (OSError, ValueError):  # the child is gone: result() says so
                pass

    def result(self, timeout_s: float | None = None):
        """The function's value once the child finished, its log records re-emitted here; None when the child
        died, failed or gave no answer within ``timeout_s`` seconds of this call (default
        :data:`CHILD_ANSWER_TIMEOUT_S`; it is ended then): its ``outputs`` are removed and the caller does the
        work itself."""
        self.release()
        msg = None
        limit = time.monotonic() + (CHILD_ANSWER_TIMEOUT_S if timeout_s is None else float(timeout_s))
        try:
            while not self._conn.poll(0.05):  # short waits: the main thread stays where Ctrl-C is handled
                if not self._proc.is_alive() and not self._conn.poll(0):
                    break
                if time.monotonic() > limit:
                    logger.warning("the background %s gave no answer in time; ending it", self.name)
                    self._proc.terminate()
                    self._proc.join(timeout=30)
                    if self._proc.is_alive():
                        self._proc.kill()
                    break
            if self._conn.poll(0):
                msg = self._conn.recv()
        except (EOFError, OSError):
            msg = None
        self._proc.join(timeout=30)
        self._conn.close()
        if msg is None:
            logger.warning("the background %s ended without an answer (exit code %s); doing it again", self.name,
                           self._proc.exitcode)
        else:
            for name, level, text in msg[2]:
                logging.getLogger(name).log(level, "%s", text)
            if msg[0] == "done":
                return msg[1]
            logger.warning("the background %s failed (%s); doing it again", self.name, msg[1])
        self._remove_outputs()
        return None

    def cancel(self) -> None:
        """End the child (if still running) and remove its ``outputs``: nothing of unused work is kept."""
        try:
            self._conn.send("stop")
        except (OSError, ValueError):
            pass
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._conn.close()
        self._remove_outputs()

    def _remove_outputs(self) -> None:
        for p in self.outputs:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()

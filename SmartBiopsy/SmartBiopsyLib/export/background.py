"""The workflow's hospital export in a separate process, so that it runs while the scene and the report are written.

The export is pure Python (pydicom, highdicom) and holds the interpreter lock, so a thread would not overlap it
with anything; a child process started with ``spawn`` does (safe in a process that runs ITK and VTK threads, and
the same on every platform). Ctrl-C is blocked in the child: the parent (the command line's handler) decides and
ends the child itself. Inside the Slicer application, or with ``SMARTBIOPSY_SERIAL=1``, nothing is started and
the workflow exports in its own process as before (:func:`process_allowed`).

:func:`export_lines` is the one place that turns an export into the summary line, so the serial and the
background export write the same sentences.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


def process_allowed() -> bool:
    """True when work may go to a child process: not inside the Slicer application (whose executable is not a
    plain Python), not switched off with ``SMARTBIOPSY_SERIAL=1``, and on the main thread (the only one that can
    block Ctrl-C for the child's start)."""
    if os.environ.get("SMARTBIOPSY_SERIAL", "") not in ("", "0"):
        return False
    slicer = sys.modules.get("slicer")
    if slicer is not None and getattr(slicer, "app", None) is not None:
        return False
    return threading.current_thread() is threading.main_thread()


def export_lines(case_dir, risk_labelmaps, accession: str, before_records=None) -> tuple[str, str | None]:
    """Export ``case_dir`` into ``<case_dir>/export``; returns (summary line, warning text or None). Never raises
    for a problem of the export (a missing library or bad data becomes the line "hospital export not written: ...").
    ``before_records``: see :func:`SmartBiopsyLib.export.case.export_case`."""
    from SmartBiopsyCoreLib.errors import SmartBiopsyError
    from SmartBiopsyLib.export.case import export_case

    case_dir = Path(case_dir)
    try:
        res = export_case(case_dir, case_dir / "export", risk_labelmaps=risk_labelmaps or None, accession=accession,
                          before_records=before_records)
        bad = sum(1 for o in res.objects if o.validation.get("errors"))
        return (f"hospital export: {res.sentence()} in export/" + (f"; {bad} object(s) FAIL dciodvfy" if bad else ""),
                None)
    except Exception as exc:  # noqa: BLE001 - the export is an extra; the report says why it is missing
        text = str(exc).strip() or type(exc).__name__
        sentence = (text.splitlines()[0] if isinstance(exc, SmartBiopsyError)
                    else f"unexpected {type(exc).__name__}: {text.splitlines()[0]}")
        return f"hospital export not written: {sentence}", str(exc)


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
    """The parent will not use the export (or is gone): the child ends without an answer."""


def _child(conn, case_dir, risk_labelmaps, accession) -> None:
    """Child process: the export up to the procedure's records, then, on the parent's "go" through ``conn``, the
    rest; then (status, line, warning, log records) through ``conn``."""
    handler = _Collect()
    root = logging.getLogger()
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
        line, warning = export_lines(case_dir, risk_labelmaps, accession, before_records=wait_for_go)
        conn.send(("done", line, warning, handler.records))
    except _Stop:
        pass
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which exports itself then
        try:
            conn.send(("crashed", f"{type(exc).__name__}: {exc}", None, handler.records))
        except OSError:
            pass
    finally:
        conn.close()


class BackgroundExport:
    """The export of one case folder running in a child process. It writes what does not depend on the procedure's
    records (segmentations, parametric maps) at once and waits for :meth:`release` (the records are written) before
    it reads targets, trajectories, needles and specimens. :meth:`result` releases it and waits for it;
    :meth:`cancel` ends it and removes what it wrote (``<case>/export``)."""

    def __init__(self, case_dir, risk_labelmaps, accession: str):
        import multiprocessing
        import signal

        self.case_dir = Path(case_dir)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._released = False
        self._proc = ctx.Process(target=_child, args=(child_conn, str(self.case_dir), risk_labelmaps, accession),
                                 name="smartbiopsy-export", daemon=True)
        # Ctrl-C blocked while the child starts (the mask is inherited through fork and exec): the terminal sends
        # SIGINT to the whole process group, and only the parent must see it; a pending one arrives on unblock
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        child_conn.close()

    def release(self) -> None:
        """Let the child read the procedure's records (plan, needles, specimens): they are all written now."""
        if not self._released:
            self._released = True
            try:
                self._conn.send("go")
            except (OSError, ValueError):  # the child is gone: result() says so and the caller exports itself
                pass

    def result(self) -> tuple[str, str | None] | None:
        """(summary line, warning or None) once the child finished, its log records re-emitted here; None when the
        child died or failed without an answer (what it wrote is removed; the caller then exports in its own
        process)."""
        self.release()
        msg = None
        try:
            while not self._conn.poll(0.05):  # short waits: the main thread stays where Ctrl-C is handled
                if not self._proc.is_alive() and not self._conn.poll(0):
                    break
            if self._conn.poll(0):
                msg = self._conn.recv()
        except (EOFError, OSError):
            msg = None
        self._proc.join(timeout=30)
        self._conn.close()
        if msg is None:
            logger.warning("the background export ended without an answer (exit code %s); exporting again",
                           self._proc.exitcode)
        else:
            for name, level, text in msg[3]:
                logging.getLogger(name).log(level, "%s", text)
            if msg[0] == "done":
                return msg[1], msg[2]
            logger.warning("the background export failed (%s); exporting again", msg[1])
        import shutil

        shutil.rmtree(self.case_dir / "export", ignore_errors=True)  # what the child wrote before it stopped
        return None

    def cancel(self) -> None:
        """End the child (if still running) and remove ``<case>/export``: a run that did not reach its report
        step leaves no export, as before."""
        import shutil

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
        shutil.rmtree(self.case_dir / "export", ignore_errors=True)

"""The ``smartbiopsy`` command: headless entry point for research users and the tests.

Each subcommand lives in its own ``SmartBiopsyLib/cli/cmd_<name>.py`` module exposing ``register(subparsers)`` and a
``run(args) -> int`` set as ``func``. Errors that a user can act on are printed as one line
``error: <message>`` with exit code 2; an unexpected failure prints one line and exit code 1 (the
traceback only with ``--debug``). Exit codes: :data:`EXIT_CODES_EPILOG`. A command's ``--out`` folder is checked
writable before any work, and a failed command leaves no new empty folder behind.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

# Subcommand modules, in the order they appear in --help. A module that fails to import (for example
# a missing optional dependency) disables only its own subcommands and says why.
COMMAND_MODULES = (
    "cmd_phantom",
    "cmd_load",
    "cmd_capsules",
    "cmd_register",
    "cmd_characterise",
    "cmd_plan",
    "cmd_calibrate",
    "cmd_robot",
    "cmd_sample",
    "cmd_specimens",
    "cmd_cohort",
    "cmd_export",
    "cmd_demo",
)


#: exit codes of every command (also in the --help epilog and Docs/SmartBiopsy.md)
EXIT_OK, EXIT_UNEXPECTED, EXIT_USER_ERROR, EXIT_WARNINGS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES_EPILOG = """exit codes:
  0    done; every step met its acceptance
  1    unexpected failure (rerun with --debug for the traceback)
  2    error you can act on: refused or missing input, output folder not writable, a step that failed
  3    finished with warnings that matter (needle tip or angle over tolerance, registration QA failed,
       robot target not reached); pass --accept-warnings to accept them and exit 0
  130  interrupted (Ctrl-C); outputs written so far are kept"""


def finish_with_warnings(warnings, accept: bool, stream=None) -> int:
    """Print each warning that matters (``warning: ...``) and return 3, or 0 when there are none or the user
    passed ``--accept-warnings`` (then they are printed as accepted)."""
    stream = stream or sys.stderr
    for w in warnings:
        stream.write(f"warning: {w}\n")
    if not warnings:
        return EXIT_OK
    if accept:
        stream.write(f"{len(warnings)} warning(s) that matter accepted (--accept-warnings)\n")
        return EXIT_OK
    stream.write(f"finished with {len(warnings)} warning(s) that matter (exit code 3); pass --accept-warnings to "
                 "accept them\n")
    stream.flush()
    return EXIT_WARNINGS


def add_accept_warnings(parser) -> None:
    """The ``--accept-warnings`` option of a command that can finish with warnings that matter."""
    parser.add_argument("--accept-warnings", action="store_true",
                        help="exit 0 even when the run finished with warnings that matter (they are still printed)")
    if not parser.epilog:
        parser.epilog = EXIT_CODES_EPILOG
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


#: commands that own their output folder transaction (staging) themselves
_OWN_OUTPUT_FOLDER = ("demo", "run")


def user_errors() -> tuple:
    """Exception classes whose message is meant for the user (the one base of every SmartBiopsy Lib)."""
    from SmartBiopsyCoreLib.errors import SmartBiopsyError

    return (SmartBiopsyError,)


class ProgressBar:
    """A one-line text progress bar for ``progress(fraction, message)`` callbacks (stderr).

    On a terminal the line is redrawn in place (cut to the terminal width while running; the final line is
    written in full); otherwise one line at the start and one at the end. A log line printed while a bar is
    drawn (:class:`ConsoleLogHandler`) first clears the bar's line and redraws it afterwards, so the two never
    share a line.
    """

    #: the bar whose line is on the terminal without its newline yet (None: the cursor is at a line start)
    _drawn: "ProgressBar | None" = None
    #: ``--quiet``: no progress bars at all (the console shows only warnings and errors)
    silent: bool = False

    def __init__(self, label: str, stream=None, width: int = 28, enabled: bool | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.perf_counter()
        self._last = ""
        self._shown = ""

    def __call__(self, fraction: float, message: str = "") -> None:
        if ProgressBar.silent:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        filled = int(round(fraction * self.width))
        line = f"{self.label:<14} [{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:3.0f}% {message}"
        if self.enabled:
            done = fraction >= 1.0
            shown = line if done else _fit_terminal(line)
            pad = max(0, len(self._shown) - len(shown))
            self.stream.write("\r" + shown + " " * pad)
            self._shown = shown
            if done:
                self.stream.write(f"  ({time.perf_counter() - self.start:.1f} s)\n")
                self._shown = ""
            ProgressBar._drawn = None if done else self
            self.stream.flush()
        elif fraction >= 1.0 or not self._last:
            self.stream.write(line + (f"  ({time.perf_counter() - self.start:.1f} s)" if fraction >= 1.0 else "") + "\n")
            self.stream.flush()
        self._last = line

    @classmethod
    def clear_line(cls, stream) -> "ProgressBar | None":
        """Blank the drawn bar's line on ``stream`` (cursor at the line start); returns the bar to redraw."""
        bar = cls._drawn
        if bar is None or bar.stream is not stream or not bar._shown:
            return None
        stream.write("\r" + " " * len(bar._shown) + "\r")
        return bar

    def redraw(self) -> None:
        if ProgressBar._drawn is self and self._shown:
            self.stream.write(self._shown)
            self.stream.flush()


def _fit_terminal(line: str) -> str:
    import shutil

    cols = shutil.get_terminal_size((120, 24)).columns - 12  # room for "  (12.3 s)"
    return line if len(line) <= cols else line[: max(cols - 1, 20)] + "\u2026"


# ----------------------------------------------------------------------------- logging: console and run.log
#: loggers of SmartBiopsy itself; records of any other logger (pyradiomics, pykwalify, highdicom, Python
#: warnings) go only to run.log, never to the console
PROJECT_LOGGERS = ("SmartBiopsyLib", "SmartBiopsyCoreLib", "RegistrationFusionLib", "TrajectoryPlannerLib",
                   "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner", "__main__")
RUN_LOG_NAME = "run.log"
RUN_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_project_record(record: logging.LogRecord) -> bool:
    return record.name.split(".", 1)[0] in PROJECT_LOGGERS


class ConsoleLogHandler(logging.StreamHandler):
    """stderr: SmartBiopsy's own records at the console level as ``WARNING: ...`` (upper case: a logged
    message, distinct from a command's own ``warning:``/``error:`` verdict lines); third-party records only with
    ``--debug``. Clears a drawn progress bar's line before writing and redraws it after."""

    def __init__(self, stream=None, third_party: bool = False):
        super().__init__(stream or sys.stderr)
        self.third_party = third_party
        self.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))

    def filter(self, record):
        if getattr(record, "console", True) is False:  # already said on the console (the outcome line)
            return False
        if not (self.third_party or is_project_record(record)):
            return False
        return super().filter(record)

    def emit(self, record):
        bar = ProgressBar.clear_line(self.stream)
        super().emit(record)
        if bar is not None:
            bar.redraw()


class RunLogHandler(logging.Handler):
    """The full log (every logger) for ``<folder>/run.log``: kept in memory from the start, streamed into the
    file once the folder exists, and the whole log written again at the end (:meth:`finish`) so that a folder
    created or replaced late still gets it. Nothing is created when the folder never appears."""

    def __init__(self, folder, level=logging.INFO):
        super().__init__(level)
        self.folder = os.fspath(folder)
        self.lines: list[str] = []
        self._file = None
        self.setFormatter(logging.Formatter(RUN_LOG_FORMAT))

    @property
    def path(self) -> str:
        return os.path.join(self.folder, RUN_LOG_NAME)

    def emit(self, record):
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad log call must never stop a run
            self.handleError(record)
            return
        self.lines.append(text)
        try:
            if self._file is None and os.path.isdir(self.folder):
                self._file = open(self.path, "w", encoding="utf-8")
                self._file.write("".join(line + "\n" for line in self.lines[:-1]))
            if self._file is not None:
                self._file.write(text + "\n")
                self._file.flush()
        except OSError:  # read-only folder: the log stays in memory; the command reports the folder itself
            self._file = None

    def finish(self) -> str | None:
        """Write the whole log to ``<folder>/run.log`` if the folder exists; returns the path (None if not)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if not self.lines or not os.path.isdir(self.folder):
            return None
        try:
            with open(self.path, "w", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in self.lines))
        except OSError:
            return None
        return self.path


_LOGGING_STATE: dict = {}


def setup_logging(args) -> RunLogHandler | None:
    """Console and run.log handlers for one command (replacing those of an earlier call in this process).

    Console (stderr): progress bars, warnings and errors of SmartBiopsy (``--debug``: everything, third-party
    too). run.log in the command's output folder (``--out``): the full log of every logger at INFO
    (``--debug``: DEBUG), Python warnings included.
    """
    import atexit

    finish_logging()
    root = logging.getLogger()
    debug = bool(getattr(args, "debug", False))
    ProgressBar.silent = bool(getattr(args, "quiet", False))
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    console = ConsoleLogHandler(third_party=debug)
    console.setLevel(logging.DEBUG if debug else logging.WARNING)
    root.addHandler(console)
    _LOGGING_STATE["handlers"] = [console]
    logging.captureWarnings(True)
    run_log = None
    folder = getattr(args, "out", None) if getattr(args, "func", None) else None
    if folder:
        run_log = RunLogHandler(folder, logging.DEBUG if debug else logging.INFO)
        root.addHandler(run_log)
        _LOGGING_STATE["handlers"].append(run_log)
        logging.getLogger(__name__).info("smartbiopsy %s: %s", package_version(),
                                         " ".join(sys.argv[1:]) if sys.argv else "")
    if not _LOGGING_STATE.get("atexit"):
        atexit.register(finish_logging)
        _LOGGING_STATE["atexit"] = True
    return run_log


def finish_logging() -> None:
    """Write run.log and remove the handlers :func:`setup_logging` added (idempotent)."""
    root = logging.getLogger()
    ProgressBar.silent = False
    for h in _LOGGING_STATE.pop("handlers", []):
        if isinstance(h, RunLogHandler):
            h.finish()
        root.removeHandler(h)


# ----------------------------------------------------------------------------- version
def package_version() -> str:
    """SmartBiopsy's version (one constant: ``SmartBiopsyCoreLib.__version__``, which pyproject.toml reads)."""
    from SmartBiopsyCoreLib import __version__

    return __version__


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="smartbiopsy",
        description="MRI-informed, CT-guided multiregional tumour biopsy (SmartBiopsy, headless).",
        epilog=EXIT_CODES_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"smartbiopsy {package_version()}",
                        help="print the SmartBiopsy version and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks, the debug log and third-party messages on the console")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars: the console shows only warnings and errors (run.log is unchanged)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    unavailable = {}
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"SmartBiopsyLib.cli.{name}")
        except ImportError as exc:
            unavailable[name] = str(exc)
            continue
        mod.register(sub)
    return parser, unavailable


def main(argv: list[str] | None = None) -> int:
    """Run one ``smartbiopsy`` command; its run.log is complete when this returns (see :func:`setup_logging`)."""
    try:
        return _command(argv)
    finally:
        finish_logging()


def _command(argv: list[str] | None = None) -> int:
    parser, unavailable = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    if not getattr(args, "func", None):
        parser.print_help()
        if unavailable:
            for name, why in unavailable.items():
                print(f"note: commands of {name} unavailable: {why}", file=sys.stderr)
        return 0 if args.command is None else 2
    return run_command(args)


def _log_outcome(level: int, line: str, exc_info=None) -> None:
    """The command's outcome into run.log only (the console has its own ``error:`` line or nothing): the exit
    code, the one-line error, and for an unexpected failure the traceback."""
    if any(isinstance(h, RunLogHandler) for h in _LOGGING_STATE.get("handlers", ())):
        logging.getLogger(__name__).log(level, line, exc_info=exc_info, extra={"console": False})


def run_command(args) -> int:
    """Run ``args.func`` with the exit-code rules: user error 2, unexpected 1, Ctrl-C 130 (one line each, no
    traceback); ``--out`` checked writable first; a new output folder left empty by a failure is removed."""
    from SmartBiopsyCoreLib.dataio.outdir import check_output_folder, nearest_existing, remove_if_new_and_empty
    from SmartBiopsyCoreLib.interruption import (INTERRUPTED_MESSAGE, install_sigint_handler, interrupted,
                                                 reset, restore_sigint_handler)

    errors = user_errors()
    out = getattr(args, "out", None)
    existing = nearest_existing(out) if out is not None else None
    ok = False
    outcome = None  # (level, line, exception) for run.log
    reset()  # a new command (main() may run several times in one process)
    previous_handler = install_sigint_handler()
    try:
        if out is not None and args.command not in _OWN_OUTPUT_FOLDER:
            check_output_folder(out)
        code = int(args.func(args) or 0)
        ok = code in (EXIT_OK, EXIT_WARNINGS)
        outcome = (logging.INFO if code == EXIT_OK else logging.WARNING, f"finished with exit code {code}", None)
        return code
    except KeyboardInterrupt:
        outcome = (logging.WARNING, f"{INTERRUPTED_MESSAGE} (exit code {EXIT_INTERRUPTED})", None)
        return _say_interrupted(INTERRUPTED_MESSAGE)
    except errors as exc:
        if interrupted():
            outcome = (logging.WARNING, f"{INTERRUPTED_MESSAGE} (exit code {EXIT_INTERRUPTED})", None)
            return _say_interrupted(INTERRUPTED_MESSAGE)
        print(f"error: {exc}", file=sys.stderr)
        outcome = (logging.ERROR, f"error: {exc} (exit code {EXIT_USER_ERROR})", None)
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        if interrupted():  # Ctrl-C that surfaced as another error (e.g. RuntimeError from inside ITK)
            outcome = (logging.WARNING, f"{INTERRUPTED_MESSAGE} (exit code {EXIT_INTERRUPTED})", None)
            return _say_interrupted(INTERRUPTED_MESSAGE)
        outcome = (logging.ERROR, f"unexpected failure ({type(exc).__name__}: {exc}; exit code {EXIT_UNEXPECTED})",
                   exc)
        if args.debug:
            raise
        print(f"error: unexpected failure ({type(exc).__name__}: {exc}); rerun with --debug for details",
              file=sys.stderr)
        return EXIT_UNEXPECTED
    finally:
        restore_sigint_handler(previous_handler)
        if not ok and out is not None:
            remove_if_new_and_empty(out, existing)
        if outcome is not None:  # after the clean-up: a folder removed as empty gets no run.log of its own
            _log_outcome(*outcome)


def _say_interrupted(message: str) -> int:
    """The one line after Ctrl-C, on a line of its own (a progress bar may be half drawn on a terminal); returns
    130. The outputs are already in place; after an ITK call stopped in its worker thread the process ends here
    (``os._exit`` after flushing the streams and the log), since a normal exit would abort inside ITK."""
    from SmartBiopsyCoreLib.interruption import console_stream, itk_worker_interrupted

    stream = console_stream()
    lead = "\n" if stream.isatty() else ""
    stream.write(f"{lead}{message}\n")
    stream.flush()
    if itk_worker_interrupted():
        _log_outcome(logging.WARNING, f"{message} (exit code {EXIT_INTERRUPTED})")
        sys.stdout.flush()
        logging.shutdown()
        os._exit(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

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
    """A one-line text progress bar for ``progress(fraction, message)`` callbacks (stderr)."""

    def __init__(self, label: str, stream=None, width: int = 28, enabled: bool | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.perf_counter()
        self._last = ""

    def __call__(self, fraction: float, message: str = "") -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        filled = int(round(fraction * self.width))
        line = f"{self.label:<14} [{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:3.0f}% {message}"
        if self.enabled:
            pad = max(0, len(self._last) - len(line))
            self.stream.write("\r" + line + " " * pad)
            if fraction >= 1.0:
                self.stream.write(f"  ({time.perf_counter() - self.start:.1f} s)\n")
            self.stream.flush()
        elif fraction >= 1.0 or not self._last:
            self.stream.write(line + (f"  ({time.perf_counter() - self.start:.1f} s)" if fraction >= 1.0 else "") + "\n")
            self.stream.flush()
        self._last = line


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="smartbiopsy",
        description="MRI-informed, CT-guided multiregional tumour biopsy (SmartBiopsy, headless).",
        epilog=EXIT_CODES_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug log")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors in the log")
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
    parser, unavailable = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("radiomics", "pykwalify"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        if unavailable:
            for name, why in unavailable.items():
                print(f"note: commands of {name} unavailable: {why}", file=sys.stderr)
        return 0 if args.command is None else 2
    return run_command(args)


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
    reset()  # a new command (main() may run several times in one process)
    previous_handler = install_sigint_handler()
    try:
        if out is not None and args.command not in _OWN_OUTPUT_FOLDER:
            check_output_folder(out)
        code = int(args.func(args) or 0)
        ok = code in (EXIT_OK, EXIT_WARNINGS)
        return code
    except KeyboardInterrupt:
        return _say_interrupted(INTERRUPTED_MESSAGE)
    except errors as exc:
        if interrupted():
            return _say_interrupted(INTERRUPTED_MESSAGE)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        if interrupted():  # Ctrl-C that surfaced as another error (e.g. RuntimeError from inside ITK)
            return _say_interrupted(INTERRUPTED_MESSAGE)
        if args.debug:
            raise
        print(f"error: unexpected failure ({type(exc).__name__}: {exc}); rerun with --debug for details",
              file=sys.stderr)
        return EXIT_UNEXPECTED
    finally:
        restore_sigint_handler(previous_handler)
        if not ok and out is not None:
            remove_if_new_and_empty(out, existing)


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
        sys.stdout.flush()
        logging.shutdown()
        os._exit(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

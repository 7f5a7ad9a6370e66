"""The ``smartbiopsy`` command: headless entry point for research users and the tests.

Each subcommand lives in its own ``SmartBiopsyLib/cli/cmd_<name>.py`` module exposing ``register(subparsers)`` and a
``run(args) -> int`` set as ``func``. Errors that a user can act on are printed as one line
``error: <message>`` with exit code 2; an unexpected failure prints one line and exit code 1 (the
traceback only with ``--debug``).
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
    errors = user_errors()
    try:
        return int(args.func(args) or 0)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; outputs written so far are kept", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        if args.debug:
            raise
        print(f"error: unexpected failure ({type(exc).__name__}: {exc}); rerun with --debug for details",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

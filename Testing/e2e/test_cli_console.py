"""The command line's own surface: --version, help text for every option in plain text, the console and the
run.log, progress bars that never share a line with a log line, and the CT/MRI input checks on real scans."""
from __future__ import annotations

import argparse
import io
import json
import logging
import re

import pytest

from conftest import smartbiopsy
from test_cli_foundation import assert_clean_error

#: reStructuredText markup that must not reach --help (``literal``, :role:`x`, `x`_)
REST_MARKUP = re.compile(r"``|:(class|func|mod|meth|attr|data|ref|doc|py:\w+):`|`_\b|\.\. \w+::")


def _subparsers(parser, path=("smartbiopsy",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))


def _all_parsers():
    from SmartBiopsyLib.cli.main import build_parser

    parser, unavailable = build_parser()
    assert not unavailable, unavailable
    return list(_subparsers(parser))


def test_every_option_of_every_subcommand_has_help_text():
    missing = []
    for path, p in _all_parsers():
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS or not action.help.strip():
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help text: {missing}"


def test_help_of_every_subcommand_is_plain_text_without_rest_markup():
    bad = {}
    for path, p in _all_parsers():
        text = p.format_help()
        found = sorted({m.group(0) for m in REST_MARKUP.finditer(text)})
        if found:
            bad[" ".join(path)] = found
    assert not bad, f"reST markup in --help: {bad}"


def test_version_option_prints_the_one_version_constant():
    import tomllib
    from pathlib import Path

    from SmartBiopsyCoreLib import __version__

    proc = smartbiopsy("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"smartbiopsy {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", __version__)
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "SmartBiopsyCoreLib.__version__"}


def test_a_log_line_never_shares_a_line_with_a_drawn_progress_bar():
    from SmartBiopsyLib.cli.main import ConsoleLogHandler, ProgressBar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    handler = ConsoleLogHandler(stream)
    handler.setLevel(logging.WARNING)
    log = logging.getLogger("SmartBiopsyLib.test_console")
    log.addHandler(handler)
    log.propagate = False
    try:
        bar = ProgressBar("plan", stream=stream)
        bar(0.4, "risk structures")
        log.warning("a warning while the bar is drawn")
        bar(1.0, "done")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    # what a terminal shows: each \r returns to the line start, later characters overwrite earlier ones
    screen = []
    for raw in stream.getvalue().split("\n"):
        line = ""
        for part in raw.split("\r"):
            line = part + line[len(part):]
        screen.append(line.rstrip())
    warn = [s for s in screen if "a warning while the bar is drawn" in s]
    assert warn == ["WARNING: a warning while the bar is drawn"], screen
    assert any(s.startswith("plan") and "100%" in s and "done" in s for s in screen), screen


def test_stage_progress_line_keeps_the_whole_stage_message(monkeypatch, tmp_path):
    from SmartBiopsyLib import workflow
    from SmartBiopsyLib.cli.main import ProgressBar

    msg = "3 targets via OpenIGTLink (auto-confirmed demo): A reached, B reached, C reached"
    monkeypatch.setattr(workflow, "_stage_load", lambda run, progress, should_cancel: msg)
    stream = io.StringIO()
    workflow.run_case(workflow.CaseInputs(name="x", ct=None), tmp_path, stop_after="load",
                      progress_factory=lambda name: ProgressBar(name, stream=stream, enabled=False))
    assert msg in stream.getvalue()


def test_third_party_records_stay_out_of_the_console_but_reach_the_run_log(tmp_path):
    from SmartBiopsyLib.cli.main import finish_logging, setup_logging

    args = argparse.Namespace(debug=False, out=str(tmp_path), func=lambda a: 0)
    err = io.StringIO()
    import sys

    old = sys.stderr
    sys.stderr = err
    try:
        setup_logging(args)
        logging.getLogger("radiomics.featureextractor").info("Calculating features with label: 1")
        logging.getLogger("radiomics.featureextractor").warning("a pyradiomics warning")
        logging.getLogger("SmartBiopsyLib.workflow").info("an info line of ours")
        logging.getLogger("SmartBiopsyLib.workflow").warning("a warning of ours")
    finally:
        finish_logging()
        sys.stderr = old
    console = err.getvalue()
    assert "WARNING: a warning of ours" in console
    assert "radiomics" not in console and "pyradiomics" not in console and "an info line" not in console
    log = (tmp_path / "run.log").read_text()
    for text in ("Calculating features", "a pyradiomics warning", "INFO SmartBiopsyLib.workflow: an info line of ours",
                 "a warning of ours"):
        assert text in log, log


def test_run_log_is_written_live_and_complete_even_when_the_folder_appears_late(tmp_path):
    from SmartBiopsyLib.cli.main import finish_logging, setup_logging

    out = tmp_path / "late"
    setup_logging(argparse.Namespace(debug=False, out=str(out), func=lambda a: 0))
    try:
        logging.getLogger("SmartBiopsyLib.x").info("before the folder exists")
        out.mkdir()
        logging.getLogger("SmartBiopsyLib.x").info("while the command runs")
        live = (out / "run.log").read_text()  # readable during the run (e.g. to follow a long one)
        assert "before the folder exists" in live and "while the command runs" in live
        (out / "run.log").unlink()  # e.g. the folder replaced by a finished staging folder
    finally:
        finish_logging()
    final = (out / "run.log").read_text()
    assert "before the folder exists" in final and "while the command runs" in final


def test_no_run_log_and_no_folder_when_the_output_folder_never_appears(tmp_path):
    from SmartBiopsyLib.cli.main import finish_logging, setup_logging

    out = tmp_path / "never"
    setup_logging(argparse.Namespace(debug=False, out=str(out), func=lambda a: 0))
    logging.getLogger("SmartBiopsyLib.x").info("something")
    finish_logging()
    assert not out.exists()


def _run_in_process(tmp_path, func, debug=False):
    """run_command with setup_logging as main() does, console captured; returns (exit code, console, run.log)."""
    import sys

    from SmartBiopsyLib.cli.main import finish_logging, run_command, setup_logging

    out = tmp_path / "out"
    out.mkdir()  # a folder that existed before the command: kept, so its run.log tells what happened
    args = argparse.Namespace(debug=debug, quiet=True, out=str(out), func=func, command="plan")
    err, old = io.StringIO(), sys.stderr
    sys.stderr = err
    try:
        setup_logging(args)
        code = run_command(args)
    finally:
        finish_logging()
        sys.stderr = old
    return code, err.getvalue(), (out / "run.log").read_text()


def test_run_log_ends_with_the_error_line_and_the_exit_code_said_once_on_the_console(tmp_path):
    from SmartBiopsyCoreLib.errors import InputDataError

    def refuse(args):
        logging.getLogger("SmartBiopsyLib.workflow").info("reading the CT")
        raise InputDataError("the CT is empty; pass the planning CT")

    code, console, log = _run_in_process(tmp_path, refuse)
    assert code == 2
    assert console.splitlines() == ["error: the CT is empty; pass the planning CT"], console
    assert log.splitlines()[-1].endswith("ERROR SmartBiopsyLib.cli.main: error: the CT is empty; pass the planning CT "
                                         "(exit code 2)"), log


def test_run_log_keeps_the_traceback_of_an_unexpected_failure_the_console_only_its_line(tmp_path):
    def crash(args):
        return {}["missing key"]

    code, console, log = _run_in_process(tmp_path, crash)
    assert code == 1 and "Traceback" not in console and len(console.splitlines()) == 1, console
    assert "unexpected failure (KeyError: 'missing key'; exit code 1)" in log
    assert "Traceback (most recent call last)" in log and "in crash" in log, log


def test_run_log_ends_with_the_exit_code_of_a_finished_command(tmp_path):
    code, console, log = _run_in_process(tmp_path, lambda args: 3)
    assert code == 3 and console == ""
    assert log.splitlines()[-1].endswith("WARNING SmartBiopsyLib.cli.main: finished with exit code 3"), log


# ------------------------------------------------------------------------- CT / MRI input checks, real scans
def _targets_file(tmp_path, vol):
    import numpy as np

    centre = vol.ijk_to_ras_points(np.array([[s / 2 for s in vol.array.shape[::-1]]]))[0]
    p = tmp_path / "targets.json"
    p.write_text(json.dumps({"frame": "RAS", "targets": [{"name": "B", "region": "B", "point_ras": centre.tolist()}]}))
    return p


@pytest.mark.parametrize("rel", ["prostatex-0000/t2_tra", "rire-pat002/pat002_mr_T2.nrrd"])
def test_plan_refuses_an_mri_given_as_the_ct(shared_data, tmp_path, rel):
    from SmartBiopsyCoreLib.dataio.imageio import load_image

    mri = shared_data / rel
    proc = smartbiopsy("plan", "--ct", mri, "--targets", _targets_file(tmp_path, load_image(mri)),
                       "--out", tmp_path / "plan")
    assert_clean_error(proc, "does not look like a CT in Hounsfield units", "pass the planning CT")
    assert "bone" not in proc.stderr


def test_capsules_refuses_a_ct_given_as_mri(shared_data):
    proc = smartbiopsy("capsules", shared_data / "rire-pat002" / "pat002_ct.nrrd", "--modality", "mr")
    assert_clean_error(proc, "looks like a CT in Hounsfield units", "--modality ct")


def test_capsules_refuses_an_mri_given_as_ct(shared_data):
    proc = smartbiopsy("capsules", shared_data / "rire-pat002" / "pat002_mr_T2.nrrd", "--modality", "ct")
    assert_clean_error(proc, "does not look like a CT in Hounsfield units")


@pytest.mark.parametrize("option", ["--ct", "--mri"])
def test_register_refuses_swapped_real_scans(shared_data, tmp_path, option):
    ct, mr = shared_data / "rire-pat002" / "pat002_ct.nrrd", shared_data / "rire-pat002" / "pat002_mr_T2.nrrd"
    args = ("--ct", mr, "--mri", mr) if option == "--ct" else ("--ct", ct, "--mri", ct)
    proc = smartbiopsy("register", *args, "--out", tmp_path / "reg")
    assert_clean_error(proc, option, "Hounsfield units")


def test_calibrate_refuses_an_mri_given_as_the_ct(shared_data, tmp_path):
    proc = smartbiopsy("calibrate", "--ct", shared_data / "prostatex-0000" / "t2_tra", "--out", tmp_path / "cal")
    assert_clean_error(proc, "does not look like a CT in Hounsfield units")


def test_sample_refuses_an_mri_given_as_the_confirmation_ct(shared_data, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"targets": [{"name": "A", "entry_ras": [0, 100, 0], "target_ras": [0, 0, 0]}]}))
    proc = smartbiopsy("sample", "--confirm-ct", shared_data / "rire-pat002" / "pat002_mr_T2.nrrd", "--plan", plan,
                       "--target", "A", "--mode", "tip-distal", "--out", tmp_path / "s")
    assert_clean_error(proc, "--confirm-ct", "does not look like a CT in Hounsfield units")


def test_characterise_refuses_a_ct_given_as_t1(shared_data, tmp_path):
    ct = shared_data / "rire-pat002" / "pat002_ct.nrrd"
    adc = shared_data / "prostatex-0000" / "adc_scanner"
    proc = smartbiopsy("characterise", "--adc", adc, "--t1-pre", ct, "--t1-post", ct, "--tumour", adc,
                       "--out", tmp_path / "c", "--no-radiomics")
    assert_clean_error(proc, "--t1-pre", "looks like a CT in Hounsfield units")


@pytest.mark.parametrize("command", [("load",), ("run", "--out", "OUT", "--case")])
def test_a_missing_file_is_not_called_a_folder(tmp_path, command):
    missing = tmp_path / "scan.nrrd"
    proc = smartbiopsy(*(str(tmp_path / "out") if a == "OUT" else a for a in command), missing)
    assert_clean_error(proc, "does not exist")
    err = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert "the folder" not in err and str(missing) in err, err


def test_summary_json_carries_the_version_and_the_input_checksums(shared_data, tmp_path):
    import hashlib

    from SmartBiopsyCoreLib import __version__
    from SmartBiopsyCoreLib.dataio.imageio import load_image
    from SmartBiopsyLib import workflow

    ct_path = shared_data / "rire-pat002" / "pat002_ct.nrrd"
    dicom = shared_data / "prostatex-0000" / "t2_tra"
    inputs = workflow.CaseInputs(name="real", ct=load_image(ct_path), mri_anatomical=load_image(dicom))
    workflow.run_case(inputs, tmp_path / "case", stop_after="load")
    summary = json.loads((tmp_path / "case" / "summary.json").read_text())
    assert summary["version"] == __version__
    by_path = {e["path"]: e for e in summary["inputs"]}
    data = ct_path.read_bytes()
    assert by_path[str(ct_path)] == {"path": str(ct_path), "sha256": hashlib.sha256(data).hexdigest(),
                                     "bytes": len(data)}
    folder = by_path[str(dicom)]
    files = sorted(p for p in dicom.rglob("*") if p.is_file())
    assert folder["files"] == len(files) and folder["bytes"] == sum(p.stat().st_size for p in files)
    assert len(folder["sha256"]) == 64


def test_quiet_leaves_only_warnings_and_errors_on_the_console(tmp_path):
    proc = smartbiopsy("--quiet", "plan", "--ct", tmp_path / "missing.nrrd", "--targets", tmp_path / "t.json",
                       "--out", tmp_path / "o")
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith(("warning:", "error:", "WARNING:", "ERROR:")) for line in lines), lines
    from SmartBiopsyLib.cli.main import ProgressBar

    stream = io.StringIO()
    ProgressBar.silent = True
    try:
        ProgressBar("plan", stream=stream, enabled=False)(1.0, "done")
    finally:
        ProgressBar.silent = False
    assert stream.getvalue() == ""


@pytest.mark.parametrize("role", ["ct", "mri_anatomical", "t1_pre", "confirm_ct"])
def test_run_load_step_refuses_the_wrong_modality_for_each_role(shared_data, tmp_path, role):
    from SmartBiopsyCoreLib.dataio.imageio import load_image
    from SmartBiopsyLib import workflow

    ct = load_image(shared_data / "rire-pat002" / "pat002_ct.nrrd")
    mri = load_image(shared_data / "rire-pat002" / "pat002_mr_T2.nrrd")
    inputs = workflow.CaseInputs(name="real", ct=ct)
    expected = "looks like a CT in Hounsfield units"
    if role == "ct":
        inputs.ct, expected = mri, "does not look like a CT in Hounsfield units"
    elif role == "confirm_ct":
        inputs.confirm_cts = [{"target": "A", "ct": mri, "source": "confirm.nrrd"}]
        expected = "the confirmation CT confirm.nrrd does not look like a CT in Hounsfield units"
    else:
        setattr(inputs, role, ct)
    with pytest.raises(workflow.StageFailed, match=expected):
        workflow.run_case(inputs, tmp_path / "case", stop_after="load")

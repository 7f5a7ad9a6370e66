"""Work the demo starts early in a child process (the hospital export from the plan step, the report's figures
from the scene step): a run interrupted before its report step leaves exactly what the steps that ran wrote (no
``export/``, no ``figures/``, no report), and the child processes are gone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

#: the demo, announcing the scene step once the report child wrote a figure (both children have written files
#: then) with the children's pids; both children stay at work once their files are written (forked: the patched
#: functions are the ones they run), so that the export child, released at the start of the scene step, cannot
#: finish before the check that both are alive
_DRIVER = r"""
import sys, time
import SmartBiopsyLib.export.case as export_case
import SmartBiopsyLib.report.writer as report_writer
import SmartBiopsyLib.scene_build as sb
from SmartBiopsyLib.cli.main import main

_build = sb.build_case_scene


def _lingering(func):
    def work(*args, **kwargs):
        value = func(*args, **kwargs)
        time.sleep(120)  # still at work when the Ctrl-C comes, its files written
        return value
    return work


export_case.export_case_line = _lingering(export_case.export_case_line)
report_writer.draw_sections = _lingering(report_writer.draw_sections)


def _announced(scene, run):
    pids = {k: run.background[k].pid for k in ("export", "report_sections") if k in run.background}
    t0 = time.monotonic()
    while not list((run.out / "figures").glob("*.png")) and time.monotonic() - t0 < 120:
        time.sleep(0.1)  # until the report child has written its first figure
    sys.stderr.write(f"\nSCENE-STEP-RUNNING {pids.get('export', 0)} {pids.get('report_sections', 0)}\n")
    sys.stderr.flush()
    time.sleep(2.0)  # the Ctrl-C lands here, in the scene step, while the children have written files
    return _build(scene, run)


sb.build_case_scene = _announced
sys.exit(main(sys.argv[1:]))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_while_the_children_work_leaves_no_export_no_figures_and_no_child(tmp_path):
    """Ctrl-C in the scene step: exit 130 with the one line, scene interrupted and report skipped, no ``export/``
    and no ``figures/`` in the case folder (both belong to the report step, which did not run) and both child
    processes ended."""
    pytest.importorskip("highdicom")
    pytest.importorskip("fhir.resources")
    from conftest import cli_env

    out = tmp_path / "case"
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, "demo", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    seen, children = [], []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "SCENE-STEP-RUNNING" in line:
                children = [int(p) for p in line.split()[1:]]
                break
        assert seen and "SCENE-STEP-RUNNING" in seen[-1], "".join(seen)[-2000:]
        assert len(children) == 2 and all(children), f"not both children started: {children}"
        assert all(_alive(p) for p in children)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(seen) + rest
    assert proc.returncode == 130, err[-3000:]
    assert [line for line in rest.splitlines() if line.strip()][-1] == "interrupted; outputs written so far are kept"
    assert "Traceback" not in err, err[-3000:]
    status = {s["name"]: s["status"] for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert status["record"] == "done" and status["scene"] == "interrupted", status
    assert status["report"] == "skipped", status
    names = sorted(p.name for p in out.iterdir())
    assert "export" not in names and "figures" not in names and "report.html" not in names, names
    assert (out / "specimens" / "journal.jsonl").exists() and (out / "plan" / "plan.json").exists()
    for _ in range(50):
        if not any(_alive(p) for p in children):
            break
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)], f"child processes still running: {children}"

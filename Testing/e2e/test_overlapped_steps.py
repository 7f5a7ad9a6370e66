"""Steps whose work starts early in a worker (characterisation maps while the fusion registers, the hospital export
in a child process while the plan, robot, sampling, scene and report steps run): a stopped or interrupted run
leaves exactly what the steps that ran wrote, and the worker is gone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

#: the demo, announcing the sample step (the background export is running then) and the export child's pid
_DRIVER = r"""
import sys, time
import SmartBiopsyLib.workflow as wf
from SmartBiopsyLib.cli.main import main

_sample = wf._stage_sample


def _announced(run, progress, should_cancel):
    job = run.background.get("export")
    sys.stderr.write(f"\nSAMPLE-STEP-RUNNING export-child={job._proc.pid if job is not None else 0}\n")
    sys.stderr.flush()
    time.sleep(3.0)  # the Ctrl-C lands here, in the sample step, while the export child works
    return _sample(run, progress, should_cancel)


wf._stage_sample = _announced
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
def test_ctrl_c_while_the_background_export_runs_leaves_no_export_and_no_child(tmp_path):
    """Ctrl-C in the sample step: exit 130 with the one line, sample interrupted, scene and report skipped, no
    ``export/`` in the case folder (the export belongs to the report step, which did not run) and the export's
    child process ended."""
    pytest.importorskip("highdicom")
    pytest.importorskip("fhir.resources")
    from conftest import cli_env

    out = tmp_path / "case"
    env = cli_env()
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, "demo", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    seen, child = [], 0
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "SAMPLE-STEP-RUNNING" in line:
                child = int(line.rsplit("=", 1)[1])
                break
        assert seen and "SAMPLE-STEP-RUNNING" in seen[-1], "".join(seen)[-2000:]
        assert child > 0, "the export did not start in a child process with the plan step"
        assert _alive(child)
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
    assert status["plan"] == "done" and status["sample"] == "interrupted", status
    assert status["scene"] == "skipped" and status["report"] == "skipped", status
    assert not (out / "export").exists(), sorted(p.name for p in out.iterdir())
    assert (out / "plan" / "plan.json").exists() and (out / "characterisation" / "habitats.nrrd").exists()
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child), f"export child {child} still running"

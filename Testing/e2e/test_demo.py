"""The main job as a user runs it: ``smartbiopsy demo`` and ``smartbiopsy run`` on bad user input."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from test_cli_foundation import assert_clean_error, smartbiopsy

SECTIONS = ("Case and procedure summary", "Fusion QA", "Habitat map and targets", "Trajectories on CT",
            "Notch ROIs and values", "Specimens", "Procedure summary", "Heterogeneity")


#: the demo's console output (stderr), kept by the demo_dir fixture for the console tests
DEMO_CONSOLE: dict = {}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = smartbiopsy("demo", "--out", out, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    DEMO_CONSOLE["stderr"] = proc.stderr
    assert "total" in proc.stdout and "report.html" in proc.stdout
    return out


def test_demo_runs_every_stage(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["load", "fuse", "characterise", "plan", "calibrate", "robot", "sample", "record", "scene",
                            "report"]
    assert all(s["status"] == "done" for s in stages.values()), stages
    assert summary["case"]["synthetic"] is True
    session = json.loads((demo_dir / "robot" / "session.json").read_text())
    assert session["auto_confirmed"] is True and session["completed"] is True
    assert [t["state"] for t in session["targets"]] == ["reached"] * 3


def test_demo_results_are_accurate_against_the_phantom_truth(demo_dir):
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

    truth = generate_phantom(0).truth
    m = np.asarray(json.loads((demo_dir / "registration" / "mri_to_ct.json").read_text())["matrix_mri_to_ct_ras"])
    pts = truth.tumour_mask_mri.voxel_centres_ras(truth.tumour_mask_mri.array > 0)[::50]
    err = np.linalg.norm((pts @ m[:3, :3].T + m[:3, 3]) - (pts @ truth.mri_to_ct[:3, :3].T + truth.mri_to_ct[:3, 3]), axis=1)
    assert err.mean() < 1.0
    targets = json.loads((demo_dir / "characterisation" / "targets.json").read_text())["targets"]
    assert sorted(t["region"] for t in targets) == ["A", "B", "C"]
    hab = truth.mri_habitats
    for t in targets:
        ijk = np.round(hab.ras_to_ijk_points(t["point_ras"])[0]).astype(int)
        assert {1: "A", 2: "B", 3: "C"}[int(hab.array[ijk[2], ijk[1], ijk[0]])] == t["region"]
        assert t["depth_mm"] >= 5.0
    for name in ("A", "B", "C"):
        det = json.loads((demo_dir / "sampling" / f"{name}_simulated" / "needle.json").read_text())
        sim_tip = np.asarray(det["simulated_truth"]["tip_ras"])
        assert np.linalg.norm(np.asarray(det["detection"]["tip_ras"]) - sim_tip) < 1.0


def test_scene_bundle_reloads_with_the_expected_nodes(demo_dir):
    from SmartBiopsyCoreLib.dataio.scene_io import load_scene_bundle

    expected = json.loads((demo_dir / "scene_nodes.json").read_text())
    rt = load_scene_bundle(demo_dir / "scene.mrb")
    scene = rt.scene
    for cls, n in expected.items():
        assert scene.GetNumberOfNodesByClass(cls) == n, cls
    assert expected["vtkMRMLScalarVolumeNode"] >= 5          # CT, T2, ADC, FF, EF
    assert expected["vtkMRMLLinearTransformNode"] == 2       # MRI -> CT and robot -> CT (calibration)
    frame = scene.GetFirstNodeByName("zframe-7tube (fitted)")
    assert frame is not None and frame.GetParentTransformNode().GetName() == "Robot to CT"
    assert expected["vtkMRMLSegmentationNode"] >= 1
    assert expected["vtkMRMLMarkupsROINode"] == 3            # one notch per target
    assert expected["vtkMRMLMarkupsLineNode"] >= 6           # trajectories + needles
    seg = scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    names = {seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(seg.GetSegmentation().GetNumberOfSegments())}
    assert {"A", "B", "C"} <= {n[:1] for n in names} or {"A", "B", "C"} <= names
    ct = scene.GetFirstNodeByName("Planning CT")
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom
    from SmartBiopsyLib.cli.cmd_demo import DEMO_ROBOT_FRAME

    shape = generate_phantom(0, robot_frame=DEMO_ROBOT_FRAME).ct.array.shape
    assert ct is not None and ct.GetImageData().GetDimensions() == shape[::-1]
    sh = scene.GetSubjectHierarchyNode()
    folders = {sh.GetItemName(sh.GetItemByPositionUnderParent(sh.GetSceneItemID(), i))
               for i in range(sh.GetNumberOfItemChildren(sh.GetSceneItemID()))}
    assert {"Images", "Registration", "Habitats", "Plan", "Sampling"} <= folders


def test_report_holds_every_section_and_real_figures(demo_dir):
    from SmartBiopsyLib.report.figures import figure_checks

    html = (demo_dir / "report.html").read_text()
    for title in SECTIONS:
        assert title in html, title
    assert "not available" not in html
    assert not re.search(r"(src|href)=\"(https?:|//)", html)
    figs = sorted((demo_dir / "figures").glob("*.png"))
    assert len(figs) >= 8
    assert html.count("data:image/png;base64,") >= len(figs)
    for f in figs:
        assert figure_checks(f)["ok"], f.name
    assert "simulated pathology" in html


def test_demo_outputs_are_labelled_simulated_wherever_they_appear(demo_dir):
    assert sorted(p.name for p in (demo_dir / "sampling").iterdir() if p.is_dir()) == \
        ["A_simulated", "B_simulated", "C_simulated"]
    assert json.loads((demo_dir / "sampling" / "notch_values.json").read_text())["simulated"] is True
    for name in "ABC":
        d = demo_dir / "sampling" / f"{name}_simulated"
        assert (d / "confirm_ct_simulated.nrrd").exists()
        for doc in ("needle.json", "notch.json"):
            assert json.loads((d / doc).read_text())["simulated"] is True, (name, doc)
    import csv
    with open(demo_dir / "specimens" / "specimens.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all("simulated" in r["notes"] for r in rows)
    assert "(simulated)" in (demo_dir / "specimens" / "procedure.json").read_text()
    html = (demo_dir / "report.html").read_text()
    for title in ("Notch ROIs and values", "Specimens", "Heterogeneity"):
        body = next(p for p in html.split("<section>") if p.startswith("<h2") and title in p.split("</h2>")[0])
        assert "simulated" in body.lower(), title


# ----------------------------------------------------------------------------------------------- run: bad input
def test_demo_writes_run_log_and_the_console_shows_only_progress_warnings_and_errors(demo_dir):
    log = (demo_dir / "run.log").read_text()
    assert re.search(r"^\S+ \S+ INFO SmartBiopsyLib\.", log, re.M), log[:2000]
    assert "radiomics" in log  # third-party messages are kept, in the log only
    err = DEMO_CONSOLE["stderr"].splitlines()
    assert not [e for e in err if e.startswith("INFO") or " INFO " in e], err
    assert not [e for e in err if "radiomics" in e.lower() or "highdicom" in e or "UserWarning" in e], err
    # every console line is a progress line, a warning, an error or a note of SmartBiopsy
    labels = ("phantom", "load", "fuse", "characterise", "plan", "calibrate", "robot", "sample", "record", "scene",
              "report")
    verdicts = ("warning:", "error:", "WARNING:", "ERROR:")
    other = [e for e in err if e.strip() and not e.startswith(labels) and not e.startswith(verdicts)]
    assert not other, other
    robot = [e for e in err if e.startswith("robot") and "100%" in e]
    assert robot and all("C reached" in e for e in robot), robot  # the stage message is not cut


def test_demo_summary_and_report_carry_the_version_and_the_input_checksums(demo_dir):
    import hashlib

    from SmartBiopsyCoreLib import __version__

    summary = json.loads((demo_dir / "summary.json").read_text())
    assert summary["version"] == __version__
    inputs = {Path(e["path"]).name: e for e in summary["inputs"]}
    assert {"ct.nrrd", "mri_t2.nrrd"} <= set(inputs), sorted(inputs)
    ct = inputs["ct.nrrd"]
    data = Path(ct["path"]).read_bytes()
    assert ct["sha256"] == hashlib.sha256(data).hexdigest() and ct["bytes"] == len(data)
    html = (demo_dir / "report.html").read_text()
    assert __version__ in html and ct["sha256"] in html


def _case_file(demo_dir, name):
    return demo_dir / "phantom" / name


def test_run_without_mri_stops_at_fusion_and_keeps_loaded_inputs(demo_dir, tmp_path):
    out = tmp_path / "run"
    proc = smartbiopsy("run", "--ct", _case_file(demo_dir, "ct.nrrd"), "--out", out)
    assert_clean_error(proc, "fuse", "MRI")
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status["load"] == "done" and status["fuse"] == "failed" and status["plan"] == "skipped"
    assert (out / "inputs" / "ct.nrrd").exists() and (out / "report.html").exists()


def test_run_refuses_mri_given_as_ct(demo_dir, tmp_path):
    proc = smartbiopsy("run", "--ct", _case_file(demo_dir, "mri_t2.nrrd"), "--out", tmp_path / "run")
    assert_clean_error(proc, "does not look like a CT")


def test_run_stops_when_the_ct_has_no_capsules(demo_dir, tmp_path):
    from SmartBiopsyCoreLib.dataio.imageio import load_image, save_image

    ct = load_image(_case_file(demo_dir, "ct.nrrd"))
    labels = load_image(_case_file(demo_dir, "truth/ct_labels.nrrd"))
    arr = ct.array.copy()
    arr[np.isin(labels.array, [10])] = -1000  # remove the capsules
    from scipy import ndimage
    arr[ndimage.binary_dilation(labels.array == 10, iterations=2) & (labels.array == 0)] = -1000
    save_image(ct.with_array(arr), tmp_path / "ct_nocaps.nrrd")
    out = tmp_path / "run"
    proc = smartbiopsy("run", "--ct", tmp_path / "ct_nocaps.nrrd", "--t2", _case_file(demo_dir, "mri_t2.nrrd"),
                       "--out", out)
    # without capsules the fusion falls back to the capsule-free intensity registration and says so; the run then
    # stops at the next missing input (no DWI here), keeping everything written so far
    assert_clean_error(proc, "characterise", "DWI")
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert stages["fuse"]["status"] == "done" and "capsule-free" in stages["fuse"]["message"]
    qa = json.loads((out / "registration" / "qa.json").read_text())
    assert qa["method"] == "intensity-only" and qa["fre_mm"] is None
    assert (out / "inputs" / "mri_t2.nrrd").exists()


def test_run_stops_when_the_tumour_lies_outside_the_images(demo_dir, tmp_path):
    from SmartBiopsyCoreLib.dataio.imageio import load_image, save_image

    tumour = load_image(_case_file(demo_dir, "truth/tumour_mask_mri.nrrd"))
    moved = tumour.ijk_to_ras.copy()
    moved[:3, 3] += 2000.0
    from SmartBiopsyCoreLib.geometry import RasVolume
    save_image(RasVolume(tumour.array, moved, "tumour"), tmp_path / "tumour_far.nrrd")
    out = tmp_path / "run"
    p = _case_file(demo_dir, "")
    proc = smartbiopsy(
        "run", "--ct", p / "ct.nrrd", "--transform", demo_dir / "registration" / "mri_to_ct.json",
        "--adc", demo_dir / "characterisation" / "adc.nrrd", "--ef", demo_dir / "characterisation" / "ef.nrrd",
        "--tumour", tmp_path / "tumour_far.nrrd", "--out", out)
    assert_clean_error(proc, "characterise", "outside")
    status = {s["name"]: s["status"] for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert status["fuse"] == "done" and status["characterise"] == "failed"
    assert (out / "registration" / "mri_to_ct.json").exists()


def test_demo_writes_the_hospital_export_and_every_dicom_object_passes_dciodvfy(demo_dir):
    """The demo's export step (report stage): SEG, Parametric Maps, TID 1500 SR and FHIR Specimens, 0 dciodvfy errors."""
    pytest.importorskip("highdicom")
    pytest.importorskip("fhir.resources")
    m = json.loads((demo_dir / "export" / "manifest.json").read_text())
    kinds = [o["kind"] for o in m["objects"]]
    assert kinds.count("seg") == 2 and kinds.count("pm") == 3 and kinds.count("sr") == 1 and kinds.count("fhir") == 4
    for o in m["objects"]:
        if o["kind"] in ("seg", "pm", "sr"):
            v = o["validation"]
            assert "skipped" in v or v["errors"] == 0, o
    assert any("simulated" in n for n in m["notes"])
    assert "Hospital export (export/)" in (demo_dir / "report.html").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------- one set of facts
def test_demo_facts_agree_and_the_scene_shows_one_chosen_path_per_target(demo_dir):
    """summary.json, the report and the scene say the same thing (issue 19: one total, one peak memory, the truth
    check in the report, simulated times before the report, chosen paths visible, candidates hidden)."""
    import html as _html

    from SmartBiopsyCoreLib import palette
    from SmartBiopsyCoreLib.dataio.scene_io import load_scene_bundle

    summary = json.loads((demo_dir / "summary.json").read_text())
    text = (demo_dir / "report.html").read_text()
    cells = [_html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", text, re.S)]
    total = next(cells[i + 1] for i, c in enumerate(cells) if c == "total time")
    assert total.startswith(f"{summary['total_seconds']:.1f} s")
    assert cells[cells.index("peak memory") + 1] == f"{summary['peak_memory_mb']:.0f} MB"
    assert "running" not in cells
    assert any(c.startswith("registration error vs truth") for c in cells)
    assert "time (UTC, simulated)" in cells and "Ki-67 (%), synthetic" in cells
    written = re.search(r"Written (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", text).group(1).replace(" ", "T")
    import csv
    with open(demo_dir / "specimens" / "specimens.csv", newline="") as fh:
        assert all(r["time_utc"][:16] <= written for r in csv.DictReader(fh))
    scene = load_scene_bundle(demo_dir / "scene.mrb").scene
    lines = [scene.GetNthNodeByClass(i, "vtkMRMLMarkupsLineNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsLineNode"))]
    paths = [n for n in lines if n.GetAttribute("TrajectoryPlanner.Target")]
    visible = sorted(n.GetName() for n in paths if n.GetDisplayNode().GetVisibility())
    assert visible == ["Chosen path A", "Chosen path B", "Chosen path C"]
    assert len(paths) > 3
    for n in paths:
        if n.GetName().startswith("Chosen path"):
            assert np.allclose(n.GetDisplayNode().GetSelectedColor(), palette.REGION_COLOURS[n.GetName()[-1]], atol=1e-3)
    seg = scene.GetFirstNodeByName("Tumour and organs at risk").GetSegmentation()
    names = {seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())}
    assert "Tumour" in names and len(names) >= 3


# ----------------------------------------------------------------------------------------------- transactional runs
def test_every_json_output_of_the_demo_is_strictly_valid_json(demo_dir):
    """No NaN/Infinity in any JSON (or JSON-lines) file the demo writes; the default demo meets every acceptance."""
    from SmartBiopsyCoreLib.dataio.jsonio import loads_strict

    files = sorted(demo_dir.rglob("*.json")) + sorted(demo_dir.rglob("*.jsonl"))
    assert len(files) >= 20, files
    for path in files:
        text = path.read_text(encoding="utf-8")
        docs = [line for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else [text]
        for doc in docs:
            try:
                loads_strict(doc)
            except ValueError as exc:
                raise AssertionError(f"{path.relative_to(demo_dir)} is not strictly valid JSON: {exc}") from None
    acceptance = json.loads((demo_dir / "summary.json").read_text())["acceptance"]
    assert acceptance["met"] is True and acceptance["warnings_that_matter"] == []


def test_demo_leaves_no_staging_folder_and_names_none(demo_dir):
    assert not [p.name for p in demo_dir.parent.iterdir() if ".staging-" in p.name]
    for path in [demo_dir / "summary.json", demo_dir / "report.html", *demo_dir.rglob("*.json")]:
        assert ".staging-" not in path.read_text(encoding="utf-8", errors="replace"), path


def test_failed_rerun_removes_the_earlier_runs_results_instead_of_showing_them(demo_dir, tmp_path):
    """A re-run into a finished case folder that fails at the fusion must not leave the earlier scene, registration
    QA ("PASSED"), plan or samples next to a summary that says the fusion failed."""
    import shutil

    case = tmp_path / "case"
    shutil.copytree(demo_dir, case, ignore=shutil.ignore_patterns("dicom", "export"))
    ct = tmp_path / "ct.nrrd"
    shutil.copy(demo_dir / "phantom" / "ct.nrrd", ct)
    (case / "operator_notes.txt").write_text("kept: not written by the workflow")
    assert (case / "scene.mrb").exists() and "PASSED" in (case / "report.html").read_text()
    proc = smartbiopsy("run", "--ct", ct, "--out", case)
    assert_clean_error(proc, "fuse", "MRI")
    summary = json.loads((case / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert status["load"] == "done" and status["fuse"] == "failed"
    for stale in ("scene.mrb", "registration", "characterisation", "plan", "robot", "sampling"):
        assert not (case / stale).exists(), f"{stale} of the earlier run is still in the case folder"
    assert (case / "specimens" / "journal.jsonl").exists()  # a user's run never removes recorded specimen pots
    assert "scene.mrb" in summary["output_folder"]["removed"]
    report = (case / "report.html").read_text()
    assert "PASSED" not in report
    assert (case / "inputs" / "ct.nrrd").exists()
    assert (case / "operator_notes.txt").read_text().startswith("kept")
    assert not [p.name for p in tmp_path.iterdir() if ".staging-" in p.name]


# A driver that runs the command line unchanged but says on stderr when an ITK registration starts, so the
# test can press Ctrl-C while SimpleITK is inside Execute.
_CTRL_C_DRIVER = r"""
import sys
import SimpleITK as sitk
from SmartBiopsyLib.cli.main import main

_execute = sitk.ImageRegistrationMethod.Execute


def _announced(self, *args):
    sys.stderr.write("\nITK-REGISTRATION-RUNNING\n")
    sys.stderr.flush()
    return _execute(self, *args)


sitk.ImageRegistrationMethod.Execute = _announced
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_inside_the_itk_registration_stops_at_once_with_one_line(demo_dir, tmp_path):
    """SIGINT while SimpleITK registers: exit 130 with "interrupted; outputs written so far are kept", no traceback,
    no registration blamed, the finished load step kept (bound 10 s; the measured time is printed)."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import cli_env

    out = tmp_path / "case"
    cmd = [sys.executable, "-c", _CTRL_C_DRIVER, "run", "--ct", str(demo_dir / "phantom" / "ct.nrrd"), "--t2",
           str(demo_dir / "phantom" / "mri_t2.nrrd"), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env())
    seen = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(line)
            if "ITK-REGISTRATION-RUNNING" in line:
                break
        assert seen and "ITK-REGISTRATION-RUNNING" in seen[-1], "".join(seen)[-2000:]
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(seen) + rest
    print(f"Ctrl-C inside the ITK registration: exit {proc.returncode} after {elapsed:.2f} s")
    assert proc.returncode == 130, err[-3000:]
    assert [line for line in rest.splitlines() if line.strip()][-1] == "interrupted; outputs written so far are kept"
    assert "Traceback" not in err and "overlap" not in err and "error:" not in rest, err[-3000:]
    assert elapsed < 10.0, f"took {elapsed:.1f} s to stop"
    status = {s["name"]: s["status"] for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert status["load"] == "done" and status["fuse"] == "interrupted" and status["report"] == "skipped"
    assert (out / "inputs" / "ct.nrrd").exists()

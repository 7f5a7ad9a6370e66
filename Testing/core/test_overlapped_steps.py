"""Work a run starts early in a worker thread (the characterisation maps, habitats and radiomics while the fusion
registers; the robot frame fit in the planning CT) fails in its own step, with the same sentence and after the
same files as when the step computes it itself (``SMARTBIOPSY_SERIAL=1``); no worker is left behind.

The steps are called directly on small synthetic volumes (no phantom): these tests check the plumbing of the
overlapped work, not the image processing."""
from __future__ import annotations

import numpy as np
import pytest

from SmartBiopsyCoreLib.errors import InputDataError, SmartBiopsyError
from SmartBiopsyCoreLib.geometry import RasVolume
from SmartBiopsyLib import workflow
from SmartBiopsyLib.workflow import CaseInputs, CaseRun, RunOptions


@pytest.fixture(params=["overlapped", "serial"])
def mode(request, monkeypatch):
    if request.param == "serial":
        monkeypatch.setenv("SMARTBIOPSY_SERIAL", "1")
    else:
        monkeypatch.delenv("SMARTBIOPSY_SERIAL", raising=False)
    return request.param


def _vol(value, dtype=np.float32, shape=(12, 16, 16), name="v"):
    return RasVolume(np.full(shape, value, dtype), np.diag([2.0, 2.0, 2.0, 1.0]), name)


def _run(tmp_path, inputs: dict | None = None, **options) -> CaseRun:
    ct = _vol(-1000, np.int16, (20, 40, 40), "ct")
    ct.array[4:16, 8:32, 8:32] = 40  # a body without any robot frame around it
    run = CaseRun(tmp_path, CaseInputs(name="T", ct=ct, **(inputs or {})), RunOptions(**options))
    run.results["mri_to_ct"] = np.eye(4)
    return run


def _quiet(f, m):
    return None


def test_a_missing_dwi_fails_the_characterise_step_with_its_sentence_and_writes_nothing(tmp_path, mode):
    run = _run(tmp_path)
    workflow._start_characterisation_inputs(run, lambda: False)
    assert ("characterisation_inputs" in run.background) == (mode == "overlapped")
    with pytest.raises(InputDataError, match=r"^no DWI \(two or more b-values\) and no ADC map were given; "):
        workflow._stage_characterise(run, _quiet, lambda: False)
    assert not run.background  # the step took the worker's result
    assert not list((tmp_path / "characterisation").iterdir())


def test_a_habitat_failure_is_raised_after_the_maps_are_written(tmp_path, mode, monkeypatch):
    """The maps, their QC and the tumour are written before the habitats are computed, as in the serial order."""
    from SmartBiopsyLib.characterise import habitats

    def fail(*args, **kwargs):
        raise InputDataError("habitats could not be computed (test)")

    monkeypatch.setattr(habitats, "compute_habitats", fail)
    tumour = _vol(0, np.uint8, name="tumour")
    tumour.array[4:8, 5:11, 5:11] = 1
    run = _run(tmp_path, {"adc": _vol(1200.0, name="adc"), "ef": _vol(30.0, name="ef"), "tumour": tumour})
    workflow._start_characterisation_inputs(run, lambda: False)
    with pytest.raises(InputDataError, match=r"^habitats could not be computed \(test\)$"):
        workflow._stage_characterise(run, _quiet, lambda: False)
    d = tmp_path / "characterisation"
    assert {p.name for p in d.iterdir()} == {"adc.nrrd", "ef.nrrd", "adc_qc.json", "ef_qc.json", "tumour.nrrd"}


def test_a_missing_robot_frame_fails_the_calibrate_step_with_its_sentence(tmp_path, mode):
    run = _run(tmp_path, robot_frame_model="zframe-7tube")
    workflow._start_robot_frame_fit(run)
    assert ("robot_frame_fit" in run.background) == (mode == "overlapped")
    with pytest.raises(SmartBiopsyError, match=r"^no zframe-7tube frame found in the CT"):
        workflow._stage_calibrate(run, _quiet, lambda: False)
    assert not run.background
    assert not (tmp_path / "robot").exists()


def test_work_of_a_step_that_does_not_run_is_ended(tmp_path, mode):
    """A run that stops before the characterise and calibrate steps ends their workers (none left running)."""
    import threading

    run = _run(tmp_path, robot_frame_model="zframe-7tube")
    workflow._start_characterisation_inputs(run, lambda: False)
    workflow._start_robot_frame_fit(run)
    workflow._end_background(run)
    assert not run.background
    assert not [t for t in threading.enumerate() if t.name.startswith("smartbiopsy-") and t.is_alive()]


def test_a_child_that_never_answers_is_ended_and_its_outputs_removed(tmp_path):
    import sys

    from SmartBiopsyLib.background import ChildJob

    if not sys.platform.startswith("linux"):
        pytest.skip("forked children: Linux only")
    out = tmp_path / "export"
    out.mkdir()
    (out / "half.dcm").write_bytes(b"partial")
    job = ChildJob("time:sleep", (3600,), outputs=[out], name="hanging job")
    assert job.result(timeout_s=1.0) is None  # the step then does the work itself
    assert not job._proc.is_alive() and not out.exists()


# ---------------------------------------------------------------------------------------------- the plan's skin map
def _plan_with_skin():
    from types import SimpleNamespace

    body = _vol(1, np.uint8, (6, 8, 8), "body")
    return SimpleNamespace(body=body, skin_points_ras=np.zeros((3, 3)), skin_clearance_mm=np.ones(3),
                           skin_targets_reachable=np.ones(3, np.int16))


def test_a_plan_without_skin_data_is_refused_in_the_plan_step(tmp_path, mode):
    from TrajectoryPlannerLib.errors import TrajectoryPlannerError

    plan = _plan_with_skin()
    plan.skin_points_ras = np.zeros((0, 3))
    with pytest.raises(TrajectoryPlannerError, match="the plan holds no skin data"):
        workflow._SkinModelJob(plan, tmp_path / "skin_model.vtp")


def test_skin_map_is_written_before_the_run_ends_and_its_error_is_said_where_it_is_used(tmp_path, mode, monkeypatch):
    import threading

    from TrajectoryPlannerLib.planning import skinmap

    gate = threading.Event()

    def slow_model(result, *a, **k):
        gate.wait(5.0)  # still building when the step ends
        return "poly"

    monkeypatch.setattr(skinmap, "skin_model", slow_model)
    monkeypatch.setattr(skinmap, "write_skin_model", lambda poly, path: path.write_text(poly))
    run = _run(tmp_path)
    path = tmp_path / "skin_model.vtp"
    if mode == "overlapped":
        threading.Timer(0.3, gate.set).start()
    else:
        gate.set()
    run.results["skin_model_job"] = workflow._SkinModelJob(_plan_with_skin(), path)
    workflow._wait_skin_model(run, raise_error=False)  # what the end of every run does
    assert path.read_text() == "poly" and run.results["skin_poly"] == "poly"

    def broken_model(result, *a, **k):
        raise RuntimeError("vtkDecimatePro ran out of memory")

    monkeypatch.setattr(skinmap, "skin_model", broken_model)
    if mode == "serial":  # computed in the plan step itself, which fails with it as before
        with pytest.raises(RuntimeError, match="out of memory"):
            workflow._SkinModelJob(_plan_with_skin(), tmp_path / "other.vtp")
        return
    run.results["skin_model_job"] = workflow._SkinModelJob(_plan_with_skin(), tmp_path / "other.vtp")
    with pytest.raises(SmartBiopsyError, match=r"the plan's skin map could not be built \(.*out of memory"):
        workflow._wait_skin_model(run)  # the scene step, the first that uses it
    assert not (tmp_path / "other.vtp").exists()


@pytest.mark.parametrize("end", ["stop after plan", "a later step fails"])
def test_a_run_that_ends_after_the_plan_step_still_has_the_whole_skin_map(tmp_path, monkeypatch, end):
    import time

    from TrajectoryPlannerLib.planning import skinmap

    monkeypatch.delenv("SMARTBIOPSY_SERIAL", raising=False)

    def slow_model(result, *a, **k):
        time.sleep(0.5)
        return "poly"

    monkeypatch.setattr(skinmap, "skin_model", slow_model)
    monkeypatch.setattr(skinmap, "write_skin_model", lambda poly, path: path.write_text(poly))
    path = tmp_path / "skin_model.vtp"

    def plan_step(run, progress, should_cancel):
        run.results["skin_model_job"] = workflow._SkinModelJob(_plan_with_skin(), path)
        return "planned"

    def failing_step(run, progress, should_cancel):
        raise InputDataError("no robot frame in the CT")

    for name in workflow.STAGES:
        monkeypatch.setattr(workflow, f"_stage_{name}", lambda run, p, c: "done")
    monkeypatch.setattr(workflow, "_stage_plan", plan_step)
    monkeypatch.setattr(workflow, "_stage_calibrate", failing_step)
    monkeypatch.setattr(workflow.CaseRun, "write_summary", lambda self: None)
    run = _run(tmp_path)
    failure = workflow._run_stages(run, None, None, "plan" if end == "stop after plan" else None)
    assert path.read_text() == "poly", "the plan step's file must be complete when the run ends"
    assert (failure is None) == (end == "stop after plan")


# ---------------------------------------------------------------------------------------------- local refinement
class _Local:
    def __init__(self, matrix):
        self.matrix, self.accepted = matrix, False

    def to_dict(self):
        return {"started_from": np.asarray(self.matrix).tolist()}


def _fusion_and_landmark(matrix):
    from types import SimpleNamespace

    lm = SimpleNamespace(matrix=np.asarray(matrix, float))
    return SimpleNamespace(matrix=np.asarray(matrix, float), landmark=lm), lm


@pytest.mark.parametrize("intensity", ["rejected", "accepted"])
def test_local_refinement_started_early_is_used_only_from_the_transform_in_use(tmp_path, monkeypatch, intensity):
    import time

    monkeypatch.delenv("SMARTBIOPSY_SERIAL", raising=False)
    calls = []

    def local(run, matrix, lm):
        calls.append(np.asarray(matrix, float).copy())
        time.sleep(0.2)
        return "anatomical", _Local(matrix)

    monkeypatch.setattr(workflow, "_local_refinement", local)
    tumour = _vol(0, np.uint8, name="tumour")
    tumour.array[4:8, 4:8, 4:8] = 1
    run = _run(tmp_path, {"tumour": tumour})
    fusion, lm = _fusion_and_landmark(np.eye(4))
    workflow._start_local_refinement(run, lm)  # the landmark transform exists: started now
    assert "local_refinement" in run.background
    if intensity == "accepted":  # the intensity refinement moved the transform: the early work is not used
        fusion.matrix = np.eye(4)
        fusion.matrix[:3, 3] = [0.5, 0.0, 0.0]
    workflow._refine_around_tumour(run, fusion, tmp_path)
    assert "local_refinement" not in run.background
    used = run.results["local_refinement"].matrix
    assert np.array_equal(used, fusion.matrix), "the local refinement must start from the transform in use"
    assert len(calls) == (1 if intensity == "rejected" else 2) and np.array_equal(calls[-1], fusion.matrix)
    assert (tmp_path / "local_refinement.json").exists()


def test_an_error_of_the_early_local_refinement_fails_the_fuse_step_with_its_sentence(tmp_path, monkeypatch):
    from RegistrationFusionLib.errors import RegistrationFusionError

    monkeypatch.delenv("SMARTBIOPSY_SERIAL", raising=False)

    def broken(run, matrix, lm):
        raise RegistrationFusionError("the tumour box lies outside the CT; check the tumour segmentation")

    monkeypatch.setattr(workflow, "_local_refinement", broken)
    tumour = _vol(0, np.uint8, name="tumour")
    tumour.array[4:8, 4:8, 4:8] = 1
    run = _run(tmp_path, {"tumour": tumour})
    fusion, lm = _fusion_and_landmark(np.eye(4))
    workflow._start_local_refinement(run, lm)
    with pytest.raises(RegistrationFusionError, match="the tumour box lies outside the CT"):
        workflow._refine_around_tumour(run, fusion, tmp_path)
    assert not (tmp_path / "local_refinement.json").exists()


def test_no_child_is_forked_while_the_preload_imports(tmp_path, monkeypatch):
    """A forked child inherits the import locks of modules a thread is importing; the export and report-figure
    children start only once the preloading worker has ended."""
    import threading
    import time

    from SmartBiopsyLib import background

    monkeypatch.delenv("SMARTBIOPSY_SERIAL", raising=False)
    run = _run(tmp_path, export=True)
    (tmp_path / "characterisation").mkdir()
    (tmp_path / "characterisation" / "habitats.nrrd").write_bytes(b"")
    started, preload_done = [], threading.Event()

    class Child:
        def __init__(self, target, *args, **kwargs):
            started.append((target, preload_done.is_set()))

        def release(self):
            pass

    def slow_preload(stop):
        time.sleep(0.3)
        preload_done.set()
        return workflow._Steps()

    monkeypatch.setattr(background, "ChildJob", Child)
    run.background["preload"] = workflow._Worker(slow_preload, "preload")
    workflow._start_background_export(run, records_written=False)
    preload_done.clear()
    run.background["preload"] = workflow._Worker(slow_preload, "preload")
    workflow._start_report_sections(run)
    assert [s[0].split(":")[1] for s in started] == ["export_case_line", "draw_sections"]
    assert all(done for _target, done in started), started

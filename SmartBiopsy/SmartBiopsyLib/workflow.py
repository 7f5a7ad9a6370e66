"""The whole smart-biopsy procedure, headless: load -> fuse -> characterise -> plan -> robot -> sample ->
record -> scene -> report. Used by ``smartbiopsy demo`` (phantom case) and ``smartbiopsy run`` (user data).

Every stage writes its outputs into the case folder as soon as it finishes; a stage that cannot proceed
stops the run with one clear message, the outputs of the finished stages are kept, and ``summary.json``
plus the report describe what happened. Folder layout (all coordinates RAS mm)::

    summary.json                 stages (status, seconds, message), case description, total_seconds and
                                 peak_memory_mb (measured once before the report; see TOTAL_COVERS), truth_check
    inputs/                      ct.nrrd, mri_t2.nrrd (the anatomical MRI used for fusion), series_used.json (--case)
    registration/                fusion.json, qa.json, mri_to_ct.json, mri_to_ct.tfm, t2_on_ct.nrrd, *.png
    characterisation/            adc/ff/ef.nrrd, adc_qc.json, ef_qc.json, tumour.nrrd, habitats.nrrd (MRI grid), regions.csv,
                                 targets.json (point_ras: MRI world, point_ct_ras: CT world), radiomics.csv
    plan/                        plan.json, skin_model.vtp
    robot/                       session.json, session.jsonl
    sampling/<target>/           confirm_ct.nrrd, needle.json, notch.json (with the patient-motion check);
                                 sampling/notch_values.json
    specimens/                   journal.jsonl, specimens.csv, procedure.json, pathology.csv (if any)
    scene.mrb, report.html

Transactional runs: a run writes into a staging folder next to the case folder (``.<name>.staging-<pid>``)
and moves its outputs in when it ends, finished or not (failed, stopped or interrupted with Ctrl-C: the outputs
of the finished stages are moved in). Every output of an earlier run that this run did not write again
(:data:`RUN_OUTPUTS`) is then REMOVED from the case folder, so the folder, ``summary.json`` and the report never
mix two runs (``summary.json`` lists what was removed under ``output_folder``). Files the workflow does not
write are left alone, and a user's run never removes ``specimens/`` (:data:`USER_RUN_OUTPUTS`: the operator's
journal of recorded pots). The case folder is checked writable before any work.

Acceptance: :func:`run_warnings` lists the warnings that matter (a step failed or was interrupted, registration
QA failed, the robot did not reach a target, a needle tip further than :data:`TIP_TOLERANCE_MM` from its target
or off-axis by more than :data:`ANGLE_TOLERANCE_DEG`); ``summary.json`` carries them under ``acceptance`` and
the command line exits 3 for them unless ``--accept-warnings`` is given.

Overlapped work (see "overlapped work" below): what does not need the step before it starts early, and the step
that owns it takes the result, so every step still records its own time, message, files and errors, in the
same order as when it computes everything itself. While the fusion registers, worker threads compute the
characterisation maps, habitats and radiomics (MRI only), fit the robot's fiducial frame (planning CT only) and
import what later steps need; the local refinement around the tumour starts from the landmark transform as soon
as it exists (used only if the intensity refinement is rejected, so that the transform in use is still that one);
the fused T2 is compressed to disk while the fusion pictures are drawn; the plan's skin map is built while the
calibrate, robot and sample steps run (a plan without skin data is still refused in the plan step). The
hospital export runs in a child process from the plan step (segmentations and maps) and reads the records once
the scene step released it; the report sections that need only the procedure's files are drawn in a child
process while the scene is built (``SmartBiopsyLib.background``). A failed, stopped or interrupted run ends the
workers and keeps nothing of their work. Inside the Slicer application, off the main thread, or with
``SMARTBIOPSY_SERIAL=1`` every step runs in order in the calling thread.

Confirmation CTs: ``run`` uses only the user's (``CaseInputs.confirm_cts``); without one per target it stops
after the plan (or robot) step with "no confirmation CT for target A; sampling needs one per target". It
never records specimen pots, a procedure log or pathology: the operator records pots
(``smartbiopsy specimens add --from-sampling``). Only the phantom demo (``RunOptions.demo_confirmation``
on a synthetic case) draws needles into copies of the planning CT, into ``sampling/<target>_simulated/``, and
records pots, dose and pathology, every one labelled simulated.
"""
from __future__ import annotations

import datetime as _dt
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from SmartBiopsyCoreLib.geometry import RasVolume
from RegistrationFusionLib.registration.landmarks import apply_transform

from SmartBiopsyCoreLib.errors import InputDataError, SmartBiopsyError

logger = logging.getLogger(__name__)

STAGES = ("load", "fuse", "characterise", "plan", "calibrate", "robot", "sample", "record", "scene", "report")

#: the names the demo writes into a case folder; an earlier run's ones that a run does not rewrite are removed
RUN_OUTPUTS = ("summary.json", "inputs", "registration", "characterisation", "plan", "robot", "sampling",
               "specimens", "scene.mrb", "scene_nodes.json", "report.html", "figures", "export", "phantom")
#: the same for a user's case: never ``specimens/`` (the operator's journal of recorded pots lives there)
USER_RUN_OUTPUTS = tuple(n for n in RUN_OUTPUTS if n not in ("specimens", "phantom"))

#: needle tip further than this from its planned target (mm) is a warning that matters: several times the
#: simulated placement error (1.5 mm lateral, +-1 mm depth) and the half length of a 10 mm notch
TIP_TOLERANCE_MM = 5.0
#: needle axis further than this from the planned direction (degrees), as the needle detection warns
ANGLE_TOLERANCE_DEG = 20.0


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_json(path: Path, data) -> Path:
    """Strict JSON (no NaN: null plus ``null_reasons``), atomically; see ``SmartBiopsyCoreLib.dataio.jsonio``."""
    from SmartBiopsyCoreLib.dataio.jsonio import write_json as _write_json

    return _write_json(path, data)


@dataclass
class CaseInputs:
    """What a run starts from. Volumes already loaded (RAS); optional results supplied instead of computed."""

    name: str
    ct: RasVolume
    mri_anatomical: RasVolume | None = None      # T2 (or another anatomical MRI) for fusion
    dwi: dict | None = None                      # b -> RasVolume
    dixon_water: RasVolume | None = None
    dixon_fat: RasVolume | None = None
    t1_pre: RasVolume | None = None
    t1_post: RasVolume | None = None
    tumour: RasVolume | None = None              # mask on an MRI grid (MRI world)
    risk_labelmaps: list = field(default_factory=list)   # [(label volume on CT grid, {value: name})]
    # results supplied instead of computed
    mri_to_ct: np.ndarray | None = None
    adc: RasVolume | None = None
    ff: RasVolume | None = None
    ef: RasVolume | None = None
    targets_ct: dict | None = None               # {name: RAS point in CT world}
    synthetic: bool = False
    source: str = ""
    truth: object = None                         # phantom truth, for the demo's accuracy lines
    # study intake and mixed grids
    dce: object = None                           # imageio.TimeSeries (kind "DCE"): EF when no T1 pre/post
    map_transforms: dict = field(default_factory=dict)   # {"ef"|"ff": 4x4 RAS map world -> ADC world}
    intake: dict | None = None                   # which series were used for what, and what was skipped
    # confirmation CTs with the needle in place: [{"target": "A" or None (match by nearest planned path),
    # "ct": RasVolume, "source": where it came from}]
    confirm_cts: list = field(default_factory=list)


@dataclass
class RunOptions:
    needle: str = ""
    notch_mode: str = "side-notch"
    planning_mode: str = "oblique"
    max_angle_deg: float = 60.0
    refine: bool = True
    operator: str = "operator"
    auto_confirm: bool = False                   # demo only: confirms the plan for the simulator, logged
    robot: str = "simulator"                     # "simulator" or "none"
    placement_error_mm: float = 1.5              # simulated confirmation CT: lateral needle error (demo)
    synthetic_pathology: bool = False            # demo: a clearly labelled synthetic pathology file
    seed: int = 0
    write_confirm_ct: bool = True
    dce_baseline_frames: int | None = None       # DCE: baseline frames (None: before bolus arrival)
    dce_post_time_s: float | None = None         # DCE: post-contrast time from the first frame (None: peak)
    robot_frame_model: str = ""                  # fiducial-frame model of the robot in the planning CT ("" = none)
    local_engine: str = "simpleitk"              # local refinement around the tumour: "simpleitk" or "elastix"
    demo_confirmation: bool = False              # demo only: draw the needle into a copy of the planning CT
    motion_tolerance_mm: float = 2.0             # patient motion (skin capsules) that triggers the correction
    correct_motion: bool = True
    export: bool = False                         # hospital export (DICOM SEG/PM/SR, FHIR) into <out>/export
    export_accession: str = ""                   # the procedure's accession number for the FHIR Specimens


#: Options that only the demo uses; a user case's summary does not list them.
DEMO_ONLY_OPTIONS = ("placement_error_mm", "synthetic_pathology", "demo_confirmation", "seed")


@dataclass
class StageRecord:
    name: str
    status: str = "pending"
    seconds: float = 0.0
    message: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 2), "message": self.message}


class StageFailed(SmartBiopsyError):
    """A stage could not proceed; ``stage`` names it. Outputs of earlier stages are kept."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage


class StageStopped(SmartBiopsyError):
    """Raised by a stage that cannot start for an expected reason (e.g. no confirmation CT yet): the run ends
    there without an error, later stages are skipped, the summary and the report are still written."""


#: What the run's one total time covers (stated in summary.json and the report).
TOTAL_COVERS = "wall time from the start of the run to the start of writing the report"


def _peak_memory_mb() -> int:
    """Peak resident memory of this process so far (MB, whole number; ru_maxrss is in kB on Linux)."""
    return int(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))


@dataclass
class CaseRun:
    """State of one run; ``results`` holds each stage's in-memory outputs."""

    out: Path
    inputs: CaseInputs
    options: RunOptions
    stages: list = field(default_factory=list)
    results: dict = field(default_factory=dict)
    lines: list = field(default_factory=list)     # summary lines printed at the end
    stopped: tuple | None = None                  # (stage, message) when a stage stopped the run (StageStopped)
    started: float = field(default_factory=time.perf_counter)   # when the run started (perf_counter s)
    facts: dict = field(default_factory=dict)     # total time and peak memory, measured once (finish_facts)
    truth_lines: list = field(default_factory=list)  # phantom truth check (synthetic cases only)
    final_out: Path | None = None                 # the case folder while ``out`` is the staging folder
    output_folder: dict | None = None             # what the move from staging replaced/removed (summary)
    background: dict = field(default_factory=dict)   # work started early in a worker (see "overlapped work")

    def truth(self, line: str) -> None:
        """One line of the phantom truth check: printed at the end and listed in summary.json and the report."""
        self.lines.append(line)
        self.truth_lines.append(line)

    def finish_facts(self) -> dict:
        """Measure the run's total time and peak memory ONCE, just before the report is written; summary.json,
        the report and the console all show these numbers (see :data:`TOTAL_COVERS`)."""
        if not self.facts:
            self.facts = {"total_seconds": round(time.perf_counter() - self.started, 1),
                          "peak_memory_mb": _peak_memory_mb(), "total_covers": TOTAL_COVERS}
        return self.facts

    def summary(self) -> dict:
        facts = self.facts or {"total_seconds": round(time.perf_counter() - self.started, 1),
                               "peak_memory_mb": _peak_memory_mb(),
                               "total_covers": "time so far: the run has not written its report yet"}
        return {
            "case": {"name": self.inputs.name, "source": self.inputs.source, "synthetic": self.inputs.synthetic},
            "stages": [s.to_dict() for s in self.stages],
            **facts,
            "options": (self.options.__dict__ if self.inputs.synthetic else
                        {k: v for k, v in self.options.__dict__.items() if k not in DEMO_ONLY_OPTIONS}),
            "lines": self.lines,
            "acceptance": _acceptance(self),
        } | ({"intake": self.inputs.intake} if self.inputs.intake else {}) | (
            {"truth_check": {"simulated": True, "lines": self.truth_lines}}
            if self.inputs.synthetic and self.truth_lines else {}) | (
            {"output_folder": self.output_folder} if self.output_folder else {}) | _provenance(self)

    def write_summary(self) -> None:
        write_json(self.out / "summary.json", self.summary())


# ---------------------------------------------------------------------- provenance (version, input checksums)
def input_paths(inputs: CaseInputs) -> list:
    """The files and folders the run's inputs were read from (each volume's ``source_path``), in input order."""
    vols = [inputs.ct, inputs.mri_anatomical, *(inputs.dwi or {}).values(), inputs.dixon_water, inputs.dixon_fat,
            inputs.t1_pre, inputs.t1_post, inputs.tumour, inputs.adc, inputs.ff, inputs.ef,
            *(lm for lm, _ in inputs.risk_labelmaps), *(c.get("ct") for c in inputs.confirm_cts)]
    vols += list(getattr(inputs.dce, "frames", None) or [])
    return [v.meta.get("source_path") for v in vols if isinstance(v, RasVolume) and v.meta.get("source_path")]


def _provenance(run: "CaseRun") -> dict:
    """``{"version", "inputs": [{"path", "sha256", "bytes"}]}`` for summary.json, computed once per run."""
    if "provenance" not in run.results:
        from SmartBiopsyCoreLib.provenance import run_provenance

        run.results["provenance"] = run_provenance(input_paths(run.inputs))
    return run.results["provenance"]


def run_case(inputs: CaseInputs, out_dir, options: RunOptions | None = None,
             progress_factory: Callable[[str], Callable[[float, str], None]] | None = None,
             should_cancel: Callable[[], bool] | None = None, stop_after: str | None = None,
             output_folder=None) -> CaseRun:
    """Run every stage on ``inputs`` into ``out_dir``. Raises :class:`StageFailed` at the first stage that
    cannot proceed, after writing ``summary.json`` and the report of what finished; Ctrl-C raises
    :class:`~SmartBiopsyCoreLib.interruption.Interrupted` after writing ``summary.json`` (no report).

    The run is transactional (module docstring): it writes into a staging folder and moves its outputs into
    ``out_dir`` when it ends, whatever happened. ``output_folder``: the caller's
    :class:`~SmartBiopsyCoreLib.dataio.outdir.OutputFolder` for ``out_dir`` (begun: the caller wrote into its
    staging folder first); by default a new one (``out_dir`` is checked writable before any work)."""
    from SmartBiopsyCoreLib.dataio.outdir import OutputFolder

    options = options or RunOptions()
    final = Path(out_dir)
    owned = RUN_OUTPUTS if (options.demo_confirmation and inputs.synthetic) else USER_RUN_OUTPUTS
    folder = output_folder if output_folder is not None else OutputFolder(final, owned=owned)
    staging = folder.staging if folder.staging is not None else folder.begin()
    run = CaseRun(Path(staging), inputs, options, final_out=final)
    try:
        failure = _run_stages(run, progress_factory, should_cancel, stop_after)
    finally:
        commit_run(run, folder)
    if failure is not None:
        raise failure
    return run


def commit_run(run: CaseRun, folder) -> None:
    """Move the run's outputs from the staging folder into the case folder (earlier outputs not rewritten are
    removed) and record that in ``summary.json``; ``run.out`` is the case folder afterwards."""
    staging = str(folder.staging) if folder.staging is not None else None
    folder.commit()
    run.out = folder.out
    prov = run.results.get("provenance")
    if staging and isinstance(prov, dict):  # inputs the demo wrote into the staging folder now live in the case folder
        for entry in prov.get("inputs") or []:
            if str(entry.get("path", "")).startswith(staging):
                entry["path"] = str(folder.out.absolute()) + str(entry["path"])[len(staging):]
    run.output_folder = {"rule": "outputs of an earlier run that this run did not write again were removed",
                         "removed": list(folder.removed)}
    if (run.out / "summary.json").exists():
        run.write_summary()


def _run_stages(run: CaseRun, progress_factory, should_cancel, stop_after) -> StageFailed | None:
    """The stages in order; returns the first stage failure (the report still runs after it). Work a stage
    started early in a worker and no stage took is ended and leaves nothing behind (:func:`_end_background`)."""
    try:
        return _run_stages_in_order(run, progress_factory, should_cancel, stop_after)
    finally:
        _wait_skin_model(run, raise_error=False)  # plan/skin_model.vtp complete before the run's outputs are moved
        _end_background(run)


def _run_stages_in_order(run: CaseRun, progress_factory, should_cancel, stop_after) -> StageFailed | None:
    from SmartBiopsyCoreLib.interruption import Interrupted, interruptible, interrupted, mark_interrupted

    should_cancel = interruptible(should_cancel) if should_cancel is not None else interruptible(lambda: False)
    progress_factory = progress_factory or (lambda name: (lambda f, m: None))
    stage_funcs = {"load": _stage_load, "fuse": _stage_fuse, "characterise": _stage_characterise,
                   "plan": _stage_plan, "calibrate": _stage_calibrate, "robot": _stage_robot, "sample": _stage_sample, "record": _stage_record,
                   "scene": _stage_scene, "report": _stage_report}
    failure: StageFailed | None = None
    stop: BaseException | None = None
    for name in STAGES:
        rec = StageRecord(name)
        run.stages.append(rec)
        if stop is not None:
            rec.status, rec.message = "skipped", "not run: interrupted by the user (Ctrl-C)"
            _end_background(run)
            continue
        if failure is not None:
            rec.status, rec.message = "skipped", f"not run: stage '{failure.stage}' failed"
            if name != "report":
                _end_background(run)  # work started for a step that will not run
                continue
        elif run.stopped is not None:
            rec.status, rec.message = "skipped", f"not run: the run stopped at step '{run.stopped[0]}'"
            if name != "report":
                _end_background(run)
                continue
        progress = interruptible(progress_factory(name))
        rec.status = "running"
        t0 = time.perf_counter()
        try:
            if should_cancel():
                raise SmartBiopsyError("cancelled by the user")
            msg = stage_funcs[name](run, progress, should_cancel) or ""
            rec.status, rec.message = "done", msg
            progress(1.0, msg)
        except StageStopped as exc:
            rec.status, rec.message = "stopped", _sentence(exc)
            run.stopped = (name, rec.message)
            progress(1.0, "stopped")
        except KeyboardInterrupt:
            mark_interrupted()
            rec.status, rec.message = "interrupted", "interrupted by the user (Ctrl-C)"
            stop = Interrupted()
        except Exception as exc:  # noqa: BLE001 - every failure becomes one sentence in the summary
            if interrupted():  # Ctrl-C that surfaced as another error (e.g. inside ITK): not the data's fault
                rec.status, rec.message = "interrupted", "interrupted by the user (Ctrl-C)"
                stop = Interrupted()
            else:
                rec.status = "failed"
                rec.message = _sentence(exc)
                logger.debug("stage %s failed", name, exc_info=True)
                if failure is None:
                    failure = StageFailed(name, rec.message)
                    failure.__cause__ = exc
        finally:
            rec.seconds = time.perf_counter() - t0
            run.write_summary()
        if stop_after == name and failure is None:
            break
    if stop is not None:
        raise stop
    return failure


def _sentence(exc: Exception) -> str:
    from SmartBiopsyCoreLib.errors import SmartBiopsyError

    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, SmartBiopsyError):
        return text.splitlines()[0]
    return f"unexpected {type(exc).__name__}: {text.splitlines()[0]}"


# ====================================================================== acceptance (exit code 3)
def run_warnings(run: CaseRun) -> list:
    """The warnings that matter of a run, one sentence each (empty: every step that ran met its acceptance).

    A stage that failed or was interrupted, a registration QA that did not pass, a robot target not reached, a
    needle tip more than :data:`TIP_TOLERANCE_MM` from its target or an axis more than
    :data:`ANGLE_TOLERANCE_DEG` off the plan. A run stopped on purpose (no confirmation CT yet) is not one."""
    out = []
    for s in run.stages:
        if s.status in ("failed", "interrupted"):
            out.append(f"step '{s.name}' {s.status}: {s.message}")
    qa = None
    fusion = run.results.get("fusion")
    if fusion is not None and getattr(fusion, "report", None) is not None:
        qa = fusion.report.to_dict()
    if isinstance(qa, dict) and qa.get("passed") is not True:
        fails = "; ".join(map(str, qa.get("failures") or [])) or "see registration/qa.json"
        out.append(f"registration QA failed ({fails})")
    robot = run.results.get("robot")
    if robot is not None and not getattr(robot, "completed", True):
        out.append("the robot did not reach every target (robot/session.json)")
    for t, det, *_rest in run.results.get("samples") or []:
        out += needle_warnings(det, getattr(t, "target", "?"))
    return out


def needle_warnings(det, target: str) -> list:
    """Warnings that matter of one needle detection: tip error or axis angle over tolerance (non-finite too)."""
    out = []
    tip, ang = float(det.tip_error_mm), float(det.angle_deg)
    if not np.isfinite(tip) or tip > TIP_TOLERANCE_MM:
        out.append(f"target {target}: needle tip {tip:.1f} mm from its planned position (tolerance "
                   f"{TIP_TOLERANCE_MM:g} mm)")
    if not np.isfinite(ang) or ang > ANGLE_TOLERANCE_DEG:
        out.append(f"target {target}: needle axis {ang:.0f} degrees from the planned direction (tolerance "
                   f"{ANGLE_TOLERANCE_DEG:g} degrees)")
    return out


def _acceptance(run: CaseRun) -> dict:
    warnings = run_warnings(run)
    return {"met": not warnings, "warnings_that_matter": warnings,
            "tolerances": {"needle_tip_mm": TIP_TOLERANCE_MM, "needle_angle_deg": ANGLE_TOLERANCE_DEG}}


# ====================================================================== stages
def _stage_load(run: CaseRun, progress, should_cancel) -> str:
    from SmartBiopsyCoreLib.dataio.imageio import save_image

    i = run.inputs
    if i.ct is None:
        raise InputDataError("no planning CT was given; pass --ct (a DICOM folder or volume file)")
    _check_ct(i.ct)
    d = run.out / "inputs"
    d.mkdir(parents=True, exist_ok=True)
    progress(0.3, "writing inputs")
    save_image(i.ct, d / "ct.nrrd", compress=False)
    if i.mri_anatomical is not None:
        _check_mri(i.mri_anatomical, "anatomical MRI")
        save_image(i.mri_anatomical, d / "mri_t2.nrrd", compress=False)
    _check_load_inputs(i)
    n = sum(v is not None for v in (i.mri_anatomical, i.dixon_water, i.dixon_fat, i.t1_pre, i.t1_post)) + len(i.dwi or {})
    extra = ""
    if i.dce is not None:
        extra = f" and a DCE of {len(i.dce.frames)} frames"
    if i.intake:
        write_json(d / "series_used.json", i.intake)
        skipped = len(i.intake.get("skipped", []))
        extra += f"; {skipped} series skipped (inputs/series_used.json)" if skipped else ""
    return f"CT {'x'.join(map(str, i.ct.array.shape[::-1]))} and {n} MRI volumes{extra}"


def _check_ct(ct: RasVolume, what: str = "the planning CT", hint: str = "pass the planning CT") -> None:
    from SmartBiopsyCoreLib.modality import require_ct

    if ct.array.size == 0:
        raise InputDataError(f"{what} is empty")
    require_ct(ct, what, hint)


def _check_mri(mri: RasVolume, what: str) -> None:
    from SmartBiopsyCoreLib.modality import require_mri

    if mri.array.size == 0:
        raise InputDataError(f"the {what} is empty")
    require_mri(mri, f"the {what}", f"pass the {what}")


def _check_load_inputs(i: CaseInputs) -> None:
    """The MRI series are MRIs and every confirmation CT is a CT in HU (one sentence for the first that is not)."""
    for what, vol in (("Dixon water image", i.dixon_water), ("Dixon fat image", i.dixon_fat),
                      ("T1 pre-contrast image", i.t1_pre), ("T1 post-contrast image", i.t1_post),
                      *((f"DWI b = {b:g}", v) for b, v in sorted((i.dwi or {}).items()))):
        if vol is not None:
            _check_mri(vol, what)
    for c in i.confirm_cts:
        _check_ct(c["ct"], f"the confirmation CT {c.get('source') or ''}".strip(),
                  "pass the confirmation CT with the needle in place")


def _stage_fuse(run: CaseRun, progress, should_cancel) -> str:
    from SmartBiopsyCoreLib.dataio.transforms import write_transform_json

    i = run.inputs
    d = run.out / "registration"
    d.mkdir(parents=True, exist_ok=True)
    if i.mri_to_ct is not None:
        m = np.asarray(i.mri_to_ct, float)
        run.results["mri_to_ct"] = m
        run.results["fusion"] = None
        write_transform_json(d / "mri_to_ct.json", m, "supplied by the user")
        return "transform supplied by the user (no capsule QA)"
    if i.mri_anatomical is None:
        raise InputDataError("no anatomical MRI (e.g. T2) was given for the capsule fusion; pass --t2 or a transform")
    from RegistrationFusionLib.registration.pipeline import fuse_with_fallback  # < 3 capsule pairs: capsule-free

    _start_characterisation_inputs(run, should_cancel)  # MRI only: runs while the fusion registers
    _start_robot_frame_fit(run)  # planning CT only
    _start_preload(run)
    fusion = fuse_with_fallback(i.ct, i.mri_anatomical, do_refine=run.options.refine, progress=progress,
                                should_cancel=should_cancel,
                                on_landmark=lambda lm: _start_local_refinement(run, lm))
    if getattr(fusion, "method", "capsules") == "intensity":
        return _stage_fuse_intensity(run, fusion, d, progress)
    _refine_around_tumour(run, fusion, d)
    run.results["fusion"] = fusion
    truth = _write_fusion_outputs(run, fusion, d, progress, "capsule fusion",
                                  np.asarray(fusion.landmark.fixed_points).mean(axis=0))
    lm = fusion.landmark
    return f"{len(lm.used)} capsule pairs, FRE {lm.fre_mm:.2f} mm" + truth


def _write_fusion_outputs(run: CaseRun, fusion, d: Path, progress, source: str, fallback_centre) -> str:
    """What every accepted fusion writes into ``registration/``: fusion.json, qa.json, the transform (schema JSON
    and ITK), the T2 resampled on the CT and the fused pictures (centred on the tumour, else on
    ``fallback_centre``; skipped with a sentence without matplotlib). Returns the truth-check text ("" for a
    patient's case)."""
    from RegistrationFusionLib.registration.qa import write_fusion_pictures
    from RegistrationFusionLib.registration.refine import resample_mri_on_ct
    from SmartBiopsyCoreLib.dataio.transforms import write_itk_transform, write_transform_json
    from SmartBiopsyCoreLib.optional import MissingPackageError

    i = run.inputs
    m = np.asarray(fusion.matrix, float)
    run.results["mri_to_ct"] = m
    write_json(d / "fusion.json", fusion.to_dict())
    write_json(d / "qa.json", fusion.report.to_dict())
    write_transform_json(d / "mri_to_ct.json", m, source)
    write_itk_transform(m, str(d / "mri_to_ct.tfm"))
    progress(0.96, "resampling MRI on CT")
    t2_on_ct = resample_mri_on_ct(i.mri_anatomical, i.ct, m)
    writing = _ImageWrite(t2_on_ct, d / "t2_on_ct.nrrd")  # compressed in a worker while the pictures are drawn
    if i.tumour is not None and np.any(i.tumour.array):
        centre = apply_transform(m, i.tumour.voxel_centres_ras(i.tumour.array > 0).mean(axis=0))
    else:
        centre = np.asarray(fallback_centre, float)
    pictures, missing, failed = {}, None, None
    try:
        pictures = write_fusion_pictures(i.ct, t2_on_ct, centre, d)
    except MissingPackageError as exc:  # matplotlib absent: the pictures are optional, the fusion is not
        missing = exc
    except BaseException as exc:  # noqa: BLE001 - raised after the image write, which came first
        failed = exc
    writing.wait(drop_on_error=list((pictures or {}).values()))
    if failed is not None:
        raise failed
    run.results["t2_on_ct"] = t2_on_ct
    if missing is not None:
        logger.warning("%s", missing)
        run.lines.append(str(missing))
    if i.truth is None:
        return ""
    err = _truth_tre(i.truth, m)
    run.truth(f"registration error vs truth at tumour points: mean {err:.2f} mm")
    return f", true TRE {err:.2f} mm"


def _stage_fuse_intensity(run: CaseRun, fusion, d, progress) -> str:
    """Outputs of an accepted capsule-free fusion (a refused one has already raised with its reason).

    ``run.results["fusion"]`` stays None as for a user-supplied transform (no capsule QA downstream);
    the intensity-only result and its QA (error estimate, not a capsule TRE) are in
    ``run.results["fusion_intensity"]`` and ``registration/qa.json``.
    """
    run.results["fusion"] = None
    run.results["fusion_intensity"] = fusion
    lo, hi = run.inputs.ct.bounds_ras()
    truth = _write_fusion_outputs(run, fusion, d, progress, "capsule-free intensity fusion", (lo + hi) / 2)
    res = fusion.intensity
    return (f"capsule-free intensity-only fusion ({fusion.fallback_reason.split(' (')[0].split(';')[0]}), error "
            f"estimate {res.error_estimate_mm:.1f} mm" + truth)


def _refine_around_tumour(run: CaseRun, fusion, d: Path) -> None:
    """Local refinement in a box around the tumour (when a tumour mask is given and refinement is on); an
    accepted result replaces ``fusion.matrix``. The candidate feeds the error model (characterise stage)."""
    run.results["fusion_base_matrix"] = np.asarray(fusion.matrix, float)
    run.results["local_refinement"] = None
    lm = getattr(fusion, "landmark", None)
    early = run.background.pop("local_refinement", None)
    if not _local_refinement_wanted(run, lm):
        if early is not None:
            early.cancel()
        return
    if early is not None and np.array_equal(early.matrix, np.asarray(fusion.matrix, float)):
        out = early.result()  # started from this same transform while the intensity refinement ran
        out.raise_at("local")
        contrast, local = out.value["contrast"], out.value["local"]
    else:  # the intensity refinement was accepted (another start), or nothing started early
        if early is not None:
            early.cancel()
        contrast, local = _local_refinement(run, fusion.matrix, lm)
    run.results["local_refinement"] = local
    write_json(d / "local_refinement.json", dict(local.to_dict(), mri_series=contrast))
    if local.accepted:
        fusion.matrix = np.asarray(local.matrix, float)


def _local_refinement_wanted(run: CaseRun, lm) -> bool:
    i = run.inputs
    return bool(run.options.refine and lm is not None and i.tumour is not None and np.any(i.tumour.array))


def _local_refinement(run: CaseRun, matrix, lm):
    """(MRI series used, LocalRefinement) of the local refinement started from ``matrix`` (MRI->CT RAS)."""
    from RegistrationFusionLib.registration.local_refine import local_contrast, refine_local
    from RegistrationFusionLib.registration.pipeline import capsule_tolerance_mm

    i = run.inputs
    # the B-spline engine measures the deformation on the Dixon fat image when given (CT-like contrast)
    contrast, mri = (local_contrast(i.dixon_fat, i.mri_anatomical) if run.options.local_engine == "bspline"
                     else ("anatomical", i.mri_anatomical))
    local = refine_local(i.ct, mri, matrix, i.tumour, engine=run.options.local_engine,
                         capsules_mri=lm.moving_points[lm.used], capsules_ct=lm.fixed_points[lm.used],
                         capsule_allowed_mm=capsule_tolerance_mm(lm, factor=2.0, floor_mm=0.5)[lm.used])
    return contrast, local


def _start_local_refinement(run: CaseRun, lm) -> None:
    """The local refinement from the landmark transform, in a worker while the intensity refinement runs: the
    fuse step takes it when the intensity refinement is rejected (the transform in use is still the landmark
    one), and otherwise computes it again from the refined transform (:func:`_refine_around_tumour`)."""
    from SmartBiopsyLib.background import process_allowed

    if not process_allowed() or not _local_refinement_wanted(run, lm) or "local_refinement" in run.background:
        return
    matrix = np.asarray(lm.matrix, float).copy()

    def work(stop) -> _Steps:
        out = _Steps()
        try:
            out.value["contrast"], out.value["local"] = _local_refinement(run, matrix, lm)
        except BaseException as exc:  # noqa: BLE001 - raised by the fuse step (raise_at) where it would have been
            out.error, out.error_at = exc, "local"
        return out

    job = _Worker(work, "local-refinement")
    job.matrix = matrix
    run.background["local_refinement"] = job


def _predicted_errors(run: CaseRun, fusion, targets_ct: dict):
    """The error model at CT-RAS target points under the transform in use (see registration/error_model.py)."""
    from RegistrationFusionLib.registration.error_model import predict_target_errors

    local = run.results.get("local_refinement")
    measured = None if local is None or local.deformation_detected is None else \
        local.deformation_mm(np.array([np.asarray(v, float).reshape(3) for v in targets_ct.values()]).reshape(-1, 3))
    return predict_target_errors(fusion.landmark, targets_ct,
                                 refined_matrix=None if local is None else local.candidate_matrix,
                                 refined_used=bool(local is not None and local.accepted),
                                 base_matrix=run.results.get("fusion_base_matrix"), measured_deformation_mm=measured)


def _targetable_depth_mm(t) -> float:
    """The registration error a target can absorb: depth - needle placement error - half notch (mm)."""
    return float(t.depth_mm - (t.required_depth_mm - t.predicted_tre_mm))


def _truth_tre(truth, m: np.ndarray) -> float:
    """Mean true registration error (mm) at tumour points; with a deformed phantom the truth includes the
    displacement field (``truth.map_mri_to_ct``), not only the rigid pose."""
    mask = truth.tumour_mask_mri
    pts = mask.voxel_centres_ras(mask.array > 0)[::97]
    true_ct = truth.map_mri_to_ct(pts) if hasattr(truth, "map_mri_to_ct") else apply_transform(truth.mri_to_ct, pts)
    return float(np.linalg.norm(apply_transform(m, pts) - true_ct, axis=1).mean())


def _stage_characterise(run: CaseRun, progress, should_cancel) -> str:
    from SmartBiopsyLib.characterise.habitats import write_regions_csv
    from SmartBiopsyCoreLib.dataio.imageio import save_image
    from SmartBiopsyLib.characterise.radiomics import write_radiomics_csv
    from SmartBiopsyLib.characterise.targets import plan_targets

    i = run.inputs
    d = run.out / "characterisation"
    d.mkdir(parents=True, exist_ok=True)
    m = run.results["mri_to_ct"]
    if i.targets_ct:
        run.results["targets_ct"] = {k: np.asarray(v, float) for k, v in i.targets_ct.items()}
        run.results["targets"] = []
        write_json(d / "targets.json", {"targets": [{"name": k, "region": k[-1:], "point_ct_ras": v}
                                                    for k, v in i.targets_ct.items()], "source": "supplied"})
        return f"{len(i.targets_ct)} targets supplied by the user"
    progress(0.05, "maps")
    pre = _characterisation_inputs(run, should_cancel)  # started with the fuse step when it could be
    run.lines.extend(pre.value["lines"])
    pre.raise_at("maps")
    adc, ef, tumour, maps = pre.value["adc"], pre.value["ef"], pre.value["tumour"], pre.value["maps"]
    for k, v in maps.items():
        save_image(v, d / f"{k}.nrrd")
    from SmartBiopsyLib.characterise.maps import write_adc_qc, write_ef_qc
    write_adc_qc(adc, d / "adc_qc.json")
    write_ef_qc(ef, d / "ef_qc.json")
    save_image(tumour, d / "tumour.nrrd")
    progress(0.45, "habitats")
    pre.raise_at("habitats")
    size, hab = pre.value["size"], pre.value["habitats"]
    save_image(hab.labels, d / "habitats.nrrd")
    fusion = run.results.get("fusion")

    def tre_at(point_mri):
        if fusion is None:
            return 2.0
        return _predicted_errors(run, fusion, {"t": apply_transform(m, point_mri)}).targets[0].p95_mm

    progress(0.6, "targets")
    targets = plan_targets(hab.labels, maps, predicted_tre_mm=tre_at,
                           registration_error=lambda p: _registration_error_mri(run, p),
                           needle=run.options.needle or None, notch_mode=run.options.notch_mode, seed=run.options.seed)
    targets_ct = {t.region: apply_transform(m, t.point_ras) for t in targets}
    tdicts = []
    for t in targets:
        td = t.to_dict()
        td["point_ct_ras"] = targets_ct[t.region].tolist()
        tdicts.append(td)
    write_json(d / "targets.json", {"targets": tdicts, "frame": "point_ras: MRI world; point_ct_ras: CT world"})
    write_regions_csv(hab, d / "regions.csv")
    progress(0.7, "radiomics")
    try:
        pre.raise_at("radiomics")
        rows = pre.value["radiomics"]
        write_radiomics_csv(rows, d / "radiomics.csv")
        run.results["radiomics"] = rows
        from SmartBiopsyLib.characterise.radiomics import NOT_AVAILABLE

        if rows and rows[0].error == NOT_AVAILABLE:  # pyradiomics absent: the table says so, the rest goes on
            run.lines.append(NOT_AVAILABLE)
    except ImportError as exc:  # pyradiomics missing: the rest of the procedure does not depend on it
        logger.warning("radiomics skipped: %s", exc)
        run.results["radiomics"] = []
    write_json(d / "characterisation.json", {"tumour": size.to_dict(), "habitats": hab.to_dict(),
                                             "targets": tdicts})
    run.results.update({"maps": maps, "habitats": hab, "targets": targets, "targets_ct": targets_ct,
                        "tumour": tumour, "tumour_size": size})
    if fusion is not None:
        from RegistrationFusionLib.registration.qa import build_report, check_targetable_depth
        rep = build_report(fusion.landmark, {t.region: targets_ct[t.region] for t in targets},
                           correspondence=fusion.correspondence, refinement=fusion.refinement)
        errs = _predicted_errors(run, fusion, {t.region: targets_ct[t.region] for t in targets})
        check_targetable_depth(rep, errs, {t.region: _targetable_depth_mm(t) for t in targets})
        if i.truth is not None and hasattr(i.truth, "map_mri_to_ct"):
            run.truth("registration error at the targets, true vs predicted 95th percentile: " + ", ".join(
                f"{t.region} {np.linalg.norm(targets_ct[t.region] - i.truth.map_mri_to_ct(t.point_ras)[0]):.2f}/"
                f"{errs.p95(t.region):.2f} mm" for t in targets))
        fusion.report = rep
        write_json(run.out / "registration" / "qa.json", rep.to_dict())
        write_json(run.out / "registration" / "fusion.json", fusion.to_dict())
    if i.truth is not None:
        run.truth("targets inside the true habitat: " + ", ".join(
            f"{t.region}={'yes' if _true_habitat(i.truth, t.point_ras) == t.region else 'NO'}" for t in targets))
    regions = ", ".join(f"{t.region} depth {t.depth_mm:.0f} mm" + (
        "" if t.hit_probability is None else f" hit {100 * t.hit_probability:.0f}%") for t in targets)
    return f"tumour {size.voxel_volume_ml / 1000:.2f} L; {regions}"


# --- hit probability (registration error at a target; re-evaluation with the planned directions) ----------
def _registration_error_ct(run: CaseRun, point_ct):
    """Registration error at a CT-world point: the error model's 95th percentile (capsule fusion), the
    capsule-free fusion's error estimate, or an isotropic 2 mm RMS when no fusion ran (supplied transform)."""
    from SmartBiopsyLib.characterise.hitprob import RegistrationError

    fusion = run.results.get("fusion")
    if fusion is not None:
        # the honest error model: rigid landmark TRE combined with the unmodelled-deformation term, as a p95
        p95 = _predicted_errors(run, fusion, {"t": np.asarray(point_ct, float)}).targets[0].p95_mm
        return RegistrationError.from_p95(p95, "error model p95 (landmark TRE + unmodelled deformation)")
    intensity = run.results.get("fusion_intensity")
    if intensity is not None:
        est = float(intensity.intensity.error_estimate_mm)
        return RegistrationError.from_p95(est, "capsule-free fusion error estimate (taken as a 95th percentile)")
    return RegistrationError.from_rms(2.0, "isotropic, RMS 2.0 mm (no registration QA in this run)")


def _registration_error_mri(run: CaseRun, point_mri):
    """:func:`_registration_error_ct` carried into the MRI world of the habitat map."""
    m = run.results["mri_to_ct"]
    return _registration_error_ct(run, apply_transform(m, point_mri)).rotated(np.linalg.inv(m)[:3, :3])


def _plan_hit_probabilities(run: CaseRun, trajectories) -> list:
    """Hit probability of each planned trajectory (planned direction), or [] without habitats."""
    from SmartBiopsyLib.characterise.hitprob import planned_hit_probabilities

    hab = run.results.get("habitats")
    if hab is None:
        return []
    return planned_hit_probabilities(hab.labels, trajectories, run.results["mri_to_ct"],
                                     lambda p: _registration_error_ct(run, p), needle=run.options.needle or None,
                                     mode=run.options.notch_mode, seed=run.options.seed)


def _true_habitat(truth, point_mri) -> str:
    h = truth.mri_habitats
    ijk = np.round(h.ras_to_ijk_points(point_mri)[0]).astype(int)
    code = int(h.array[ijk[2], ijk[1], ijk[0]])
    return {1: "A", 2: "B", 3: "C"}.get(code, "-")


def _stage_plan(run: CaseRun, progress, should_cancel) -> str:
    from TrajectoryPlannerLib.planning.engine import PlanSettings, plan
    from TrajectoryPlannerLib.planning.needles import DEFAULT_NEEDLE

    _start_background_export(run, records_written=False)  # segmentations and maps while the next steps run
    i = run.inputs
    d = run.out / "plan"
    d.mkdir(parents=True, exist_ok=True)
    tct = run.results.get("targets_ct") or {}
    if not tct:
        raise InputDataError("there are no targets to plan for; the habitat step proposed none")
    targets = [{"name": k, "region": k, "point_ras": list(map(float, v))} for k, v in tct.items()]
    settings = PlanSettings(mode=run.options.planning_mode, max_angle_deg=run.options.max_angle_deg)
    needle = run.options.needle or DEFAULT_NEEDLE
    result = plan(i.ct, targets, needle=needle, labelmaps=i.risk_labelmaps or None, settings=settings,
                  progress=progress, should_cancel=should_cancel)
    run.results["plan"] = result
    pdict = result.to_dict()
    best = _best_trajectories(result)
    pdict["robot_trajectories"] = [{"name": t.region or t.target, "region": t.region or t.target,
                                    "entry_ras": t.entry_ras, "target_ras": t.target_ras} for t in best]
    pdict["registration_qa"] = _registration_qa_for_robot(run, best)
    hits = _plan_hit_probabilities(run, result.trajectories)
    for td, hp in zip(pdict["trajectories"], hits):
        if hp is not None:
            td["hit_probability"] = hp.to_dict()
    run.results["plan_hit_probability"] = {t.target: h for t, h in zip(result.trajectories, hits)
                                           if h is not None and any(t is b for b in best)}
    write_json(d / "plan.json", pdict)
    progress(0.9, "skin accessibility model")
    run.results["skin_model_job"] = _SkinModelJob(result, d / "skin_model.vtp")
    run.results["best_trajectories"] = best
    ph = run.results.get("plan_hit_probability") or {}
    return "; ".join(f"{t.target}: {t.length_mm:.0f} mm, {t.angle_to_axial_deg:.0f} deg"
                     + (f", hit {ph[t.target].percent:.0f}%" if t.target in ph else "") for t in best)


def _best_trajectories(result) -> list:
    best = {}
    for t in result.trajectories:
        if t.target not in best or t.rank < best[t.target].rank:
            best[t.target] = t
    return [best[k] for k in sorted(best)]


def _registration_qa_for_robot(run: CaseRun, best) -> dict:
    """The registration QA the robot gate reads (qa.json format); none -> a QA that does not pass.

    Capsule fusion: its QA report. Capsule-free fusion: the intensity-only QA evaluated at the planned
    targets (its error estimate at each). A transform supplied by the user has no QA: the gate refuses."""
    fusion = run.results.get("fusion")
    if fusion is not None:
        return fusion.report.to_dict()
    intensity = run.results.get("fusion_intensity")
    if intensity is not None:
        from RegistrationFusionLib.registration.qa import build_intensity_report

        return build_intensity_report(intensity.intensity, {t.target: list(t.target_ras) for t in best}).to_dict()
    return {"passed": False, "failures": ["no registration QA: the MRI->CT transform was supplied"]}


def _stage_calibrate(run: CaseRun, progress, should_cancel) -> str:
    """Robot-to-CT calibration from the robot's fiducial frame in the planning CT (robot/calibration/)."""
    from TrajectoryPlannerLib.calibration.calibration_file import write_calibration
    from TrajectoryPlannerLib.calibration.frame_fit import check_calibration
    from TrajectoryPlannerLib.calibration.picture import write_calibration_picture

    if not run.options.robot_frame_model:
        return "skipped (no robot fiducial frame model given)"
    fitted = _robot_frame_fit(run, should_cancel, progress)  # fitted while the fusion ran when it could be
    fitted.raise_at("fit")
    model = fitted.value["model"]
    targets = {t.target: list(t.target_ras) for t in run.results["best_trajectories"]}
    result = check_calibration(fitted.value["fit"], targets, progress=lambda f, m: progress(0.9 * f, m))
    d = run.out / "robot" / "calibration"
    write_calibration(result, d)
    write_calibration_picture(run.inputs.ct, result, d / "calibration.png")
    run.results["calibration"] = result
    worst = max(result.target_errors.values()) if result.target_errors else float("nan")
    msg = (f"{model.name}: {len(result.residuals_mm)} fiducials, residual RMS {result.rms_mm:.2f} mm, predicted "
           f"error at targets <= {worst:.2f} mm (95 %)")
    truth = getattr(run.inputs.truth, "robot_to_ct", None)
    if truth is not None:
        c = model.centre
        m = result.matrix_robot_to_ct_ras
        err = float(np.linalg.norm(m[:3, :3] @ c + m[:3, 3] - (truth[:3, :3] @ c + truth[:3, 3])))
        write_json(d / "truth_check.json", {"frame_centre_error_mm": err, "simulated": True})
        msg += f"; {err:.2f} mm from the simulated truth"
        run.truth(f"robot calibration vs truth: fitted frame centre {err:.2f} mm from the simulated frame")
    if not result.passed:
        failed = ", ".join(k for k, c in result.checks.items() if not c["passed"])
        raise SmartBiopsyError(f"the robot calibration failed its QA ({failed}); see robot/calibration/calibration_qa.json")
    return msg


def _stage_robot(run: CaseRun, progress, should_cancel) -> str:
    from TrajectoryPlannerLib.robot.protocol import RobotPlan, RobotSession
    from TrajectoryPlannerLib.robot.simulator import RobotSimulator, Workspace

    if run.options.robot == "none":
        return "skipped (no robot)"
    d = run.out / "robot"
    d.mkdir(parents=True, exist_ok=True)
    best = run.results["best_trajectories"]
    plan = RobotPlan.from_dict({
        "trajectories": [{"name": t.target, "region": t.region or t.target, "entry_ras": list(t.entry_ras),
                          "target_ras": list(t.target_ras)} for t in best],
        "registration_qa": _registration_qa_for_robot(run, best)})
    calibration = run.results.get("calibration")
    if calibration is not None:
        # the robot-to-CT calibration computed from the robot's fiducial frame (calibrate stage), validated again
        from TrajectoryPlannerLib.robot.calibration_io import calibration_from_dict

        plan.use_calibration(calibration_from_dict(calibration.to_dict(), "the computed robot calibration"))
    elif run.inputs.synthetic:
        # a simulated robot without a frame in the scan works in CT RAS: stated explicitly and logged
        plan.state_robot_frame_ct("the demo (the simulated robot works in CT coordinates)")
    else:
        raise SmartBiopsyError("no robot calibration: give the robot's fiducial frame model (--robot-frame-model) so "
                               "the run can calibrate the robot from the planning CT")
    if not run.options.auto_confirm:
        raise SmartBiopsyError("the robot session needs the operator's confirmation of the plan; "
                               "rerun with --confirm after reviewing plan/plan.json")
    centre = np.mean([t.target_ras for t in best], axis=0)
    if plan.calibration_matrix is not None:
        centre = (np.linalg.inv(plan.calibration_matrix) @ np.append(centre, 1.0))[:3]  # the workspace is in robot coordinates
    ws = Workspace(lower_mm=tuple(centre - 250.0), upper_mm=tuple(centre + 250.0))
    sim = RobotSimulator(0, "127.0.0.1", workspace=ws, speed_mm_s=400.0, log_path=d / "robot_side.jsonl").start()
    try:
        with RobotSession("127.0.0.1", sim.port, log_path=d / "session.jsonl") as session:
            session.load_plan(plan)
            logger.warning("DEMO: plan auto-confirmed for the robot simulator (operator '%s')", run.options.operator)
            session.confirm_plan(operator=f"{run.options.operator} (auto-confirmed in the demo)")
            result = session.run_plan(confirm=True, progress=lambda f, msg: progress(0.1 + 0.85 * f, str(msg)),
                                      should_cancel=should_cancel)
    finally:
        sim.stop()
    rd = result.to_dict()
    rd["auto_confirmed"] = True
    write_json(d / "session.json", rd)
    run.results["robot"] = result
    states = ", ".join(f"{t.name} {t.state}" for t in result.targets)
    if not result.completed:
        raise SmartBiopsyError(f"the robot did not reach every target ({states}); see robot/session.jsonl")
    return f"{len(best)} targets via OpenIGTLink (auto-confirmed demo): {states}"


def _stage_sample(run: CaseRun, progress, should_cancel) -> str:
    """Needle and notch values from one confirmation CT per target. Only the demo (a synthetic case with
    ``demo_confirmation``) draws its needles; every other run needs real confirmation CTs or stops here."""
    if run.options.demo_confirmation:
        if not run.inputs.synthetic:
            raise SmartBiopsyError("needles are drawn only in the phantom demo; give real confirmation CTs "
                                   "with --confirm-ct")
        return _sample_demo(run, progress, should_cancel)
    return _sample_confirmation_cts(run, progress, should_cancel)


def _sample_demo(run: CaseRun, progress, should_cancel) -> str:
    """Demo only: a confirmation CT per target simulated from the planning CT; everything it writes says so
    (``sampling/<target>_simulated/``, ``"simulated": true``, ``confirm_ct_simulated.nrrd``)."""
    from SmartBiopsyCoreLib.dataio.imageio import save_image
    from SmartBiopsyLib.sampling.needle import detect_needle
    from SmartBiopsyLib.sampling.needle_sim import simulate_confirmation_ct
    from SmartBiopsyLib.sampling.notch import notch_roi_from_detection, sample_maps

    i = run.inputs
    d = run.out / "sampling"
    best = run.results["best_trajectories"]
    maps = run.results.get("maps")
    if not maps:
        raise InputDataError("no parameter maps to sample; the characterisation step did not produce them")
    m = run.results["mri_to_ct"]
    needle = run.results["plan"].needle
    rng = np.random.default_rng(run.options.seed + 77)
    all_values, samples = {}, []
    for n, t in enumerate(best):
        progress(n / len(best), f"confirmation CT {t.target}")
        tip_plan = t.tip_ras if t.tip_ras is not None else t.target_ras
        sim = simulate_confirmation_ct(i.ct, t.entry_ras, tip_plan, needle,
                                       lateral_error_mm=float(rng.uniform(0.3, 1.0) * run.options.placement_error_mm),
                                       depth_error_mm=float(rng.uniform(-1.0, 1.0)), seed=run.options.seed + n)
        det = detect_needle(sim.ct, t.entry_ras, tip_plan, target_name=t.target, needle=needle)
        roi = notch_roi_from_detection(det, mode=run.options.notch_mode, needle=needle)
        vals = sample_maps(roi, maps, mri_to_ct=m)
        td = d / f"{t.target}_simulated"
        td.mkdir(parents=True, exist_ok=True)
        if run.options.write_confirm_ct:
            save_image(_crop_around(sim.ct, [t.entry_ras, tip_plan], 40.0), td / "confirm_ct_simulated.nrrd")
        write_json(td / "needle.json", {"simulated": True, "detection": det.to_dict(),
                                        "simulated_truth": sim.truth.to_dict(),
                                        "confirmation_ct": {"source": "simulated from the planning CT (demo)"}})
        write_json(td / "notch.json", {"simulated": True, "roi": roi.to_dict(), "values": vals.to_dict()})
        all_values[t.target] = vals.to_dict()
        samples.append((t, det, roi, vals))
    all_values["simulated"] = True
    write_json(d / "notch_values.json", all_values)
    run.results["samples"] = samples
    errs = [f"{t.target} tip {det.tip_error_mm:.1f} mm" for t, det, _, _ in samples]
    if i.truth is not None:
        truth_maps = {"adc": i.truth.adc, "ef": i.truth.ef}
        devs = []
        for t, det, roi, vals in samples:
            tv = sample_maps(roi, truth_maps, mri_to_ct=i.truth.mri_to_ct)
            for k in truth_maps:
                devs.append(abs(vals.maps[k].mean / tv.maps[k].mean - 1.0))
        run.truth(f"notch ADC/EF vs truth in the same ROI: max deviation {100 * max(devs):.1f} %")
    return "simulated confirmation CTs: " + "; ".join(errs)


def _path_distance_mm(points, entry, target, beyond_mm: float = 40.0) -> float:
    """Median distance (mm) of ``points`` from the planned segment entry -> target extended ``beyond_mm``."""
    e, t = np.asarray(entry, float), np.asarray(target, float)
    d = t - e
    length = float(np.linalg.norm(d))
    d /= length
    s = np.clip((points - e) @ d, 0.0, length + beyond_mm)
    return float(np.median(np.linalg.norm(points - (e + s[:, None] * d), axis=1)))


def _metal_points(ct: RasVolume, threshold_hu: float = 1500.0, max_points: int = 20000) -> np.ndarray:
    idx = np.argwhere(np.asarray(ct.array) > threshold_hu)
    if len(idx) > max_points:
        idx = idx[:: int(np.ceil(len(idx) / max_points))]
    return ct.kji_to_ras_points(idx) if len(idx) else np.zeros((0, 3))


def _planning_capsules(run: CaseRun):
    """Skin capsules of the planning CT: from the fusion when it ran, else detected once (None if none)."""
    if "planning_capsules" in run.results:
        return run.results["planning_capsules"]
    fusion = run.results.get("fusion")
    caps = getattr(fusion, "detection_ct", None) if fusion is not None else None
    if caps is None:
        from RegistrationFusionLib.capsules.detection import detect_capsules

        try:
            caps = detect_capsules(run.inputs.ct, "ct")
        except SmartBiopsyError as exc:
            logger.warning("no skin capsules in the planning CT (%s); patient motion cannot be checked", exc)
            caps = None
    run.results["planning_capsules"] = caps
    return caps


def _assign_confirmation_cts(run: CaseRun, best: list, progress) -> dict:
    """{target: (confirmation-CT item, MotionCheck of the skin capsules, source, how it was matched)}; unlabelled
    CTs go to the planned path nearest to their metal (in the planning frame, after the capsule motion check)."""
    from SmartBiopsyLib.sampling.motion import check_patient_motion

    names = [t.target for t in best]
    paths = {t.target: (np.asarray(t.entry_ras, float), np.asarray(t.tip_ras if t.tip_ras is not None
                                                                      else t.target_ras, float)) for t in best}
    caps = _planning_capsules(run)
    assigned: dict = {}
    items = list(run.inputs.confirm_cts or [])
    for n, item in enumerate(items):
        progress(0.3 * n / max(len(items), 1), f"confirmation CT {n + 1}: patient motion")
        label = item.get("target")
        src = item.get("source") or f"confirmation CT {n + 1}"
        if label is not None and str(label) not in names:
            raise InputDataError(f"confirmation CT {src} is given for target '{label}', which is not in the plan "
                                 f"(targets: {', '.join(names)}); check --confirm-ct")
        ct = item["ct"]
        target_hint = paths[str(label)][1] if label is not None else None
        motion = check_patient_motion(caps if caps is not None else np.zeros((0, 3)), ct,
                                      tolerance_mm=run.options.motion_tolerance_mm,
                                      correct=run.options.correct_motion, target_ras=target_hint)
        if label is not None:
            how = "named by the user"
        else:
            from RegistrationFusionLib.registration.landmarks import apply_transform

            metal = _metal_points(ct)
            if len(metal) < 10:
                raise InputDataError(f"confirmation CT {src} shows no needle (no metal above 1500 HU); "
                                     "check that it is the scan with the needle in place")
            metal = apply_transform(motion.confirmation_to_planning, metal)
            dist = {k: _path_distance_mm(metal, *paths[k]) for k in names}
            label = min(dist, key=dist.get)
            if dist[label] > 15.0:
                raise InputDataError(f"the needle in confirmation CT {src} lies {dist[label]:.0f} mm from the nearest "
                                     f"planned path ({label}); name its target with --confirm-ct {label}=PATH")
            how = f"nearest planned path: {label} at {dist[label]:.1f} mm (median distance of the metal)"
        if label in assigned:
            raise InputDataError(f"two confirmation CTs were matched to target {label} ({assigned[label][2]} and "
                                 f"{src}); name each one's target with --confirm-ct {label}=PATH")
        assigned[label] = (item, motion, src, how)
    return assigned


def _sample_confirmation_cts(run: CaseRun, progress, should_cancel) -> str:
    """Needle detection, patient-motion check and notch values on the user's confirmation CTs, one per target.
    Without one for every target the run stops here (:class:`StageStopped`)."""
    from SmartBiopsyCoreLib.dataio.imageio import save_image
    from SmartBiopsyLib.sampling.motion import check_patient_motion, to_planning_frame
    from SmartBiopsyLib.sampling.needle import detect_needle
    from SmartBiopsyLib.sampling.notch import notch_roi_from_detection, sample_maps

    i = run.inputs
    best = run.results["best_trajectories"]
    if not i.confirm_cts:
        raise StageStopped(f"no confirmation CT for target {best[0].target}; sampling needs one per target")
    maps = run.results.get("maps")
    if not maps:
        raise InputDataError("no parameter maps to sample; the characterisation step did not produce them")
    assigned = _assign_confirmation_cts(run, best, progress)
    missing = [t.target for t in best if t.target not in assigned]
    if missing:
        raise StageStopped(f"no confirmation CT for target {missing[0]}; sampling needs one per target")
    d = run.out / "sampling"
    m = run.results["mri_to_ct"]
    needle = run.results["plan"].needle
    all_values, samples, lines = {}, [], []
    for n, t in enumerate(best):
        progress(0.3 + 0.7 * n / len(best), f"confirmation CT {t.target}")
        item, motion, src, how = assigned[t.target]
        tip_plan = np.asarray(t.tip_ras if t.tip_ras is not None else t.target_ras, float)
        entry = np.asarray(t.entry_ras, float)
        if motion.checked:
            # again with this target and the planning CT: motion at the target, tissue motion around it
            motion = check_patient_motion(_planning_capsules(run), item["ct"],
                                          tolerance_mm=run.options.motion_tolerance_mm,
                                          correct=run.options.correct_motion, target_ras=tip_plan, planning_ct=i.ct)
        if motion.corrected:
            ct = to_planning_frame(item["ct"], motion, i.ct, [entry, tip_plan])
        else:
            ct = _crop_around(item["ct"], [entry, tip_plan], 45.0)
        det = detect_needle(ct, entry, tip_plan, target_name=t.target, needle=needle)
        det.warnings = list(det.warnings) + list(motion.warnings)
        roi = notch_roi_from_detection(det, mode=run.options.notch_mode, needle=needle)
        vals = sample_maps(roi, maps, mri_to_ct=m)
        td = d / t.target
        td.mkdir(parents=True, exist_ok=True)
        if run.options.write_confirm_ct:
            save_image(ct, td / "confirm_ct.nrrd")
        conf = {"source": src, "matched": how, "frame": "planning CT" if motion.corrected else "as scanned"}
        write_json(td / "needle.json", {"detection": det.to_dict(), "confirmation_ct": conf,
                                        "patient_motion": motion.to_dict()})
        write_json(td / "notch.json", {"roi": roi.to_dict(), "values": vals.to_dict(),
                                       "patient_motion": motion.to_dict(), "confirmation_ct": conf})
        all_values[t.target] = vals.to_dict()
        samples.append((t, det, roi, vals))
        lines.append(f"{t.target} tip {det.tip_error_mm:.1f} mm (motion {motion.summary()})")
        for w in motion.warnings:
            logger.warning("target %s: %s", t.target, w)
            run.lines.append(f"WARNING target {t.target}: {w}")
        run.lines.append(f"confirmation CT for {t.target}: {src} ({how})")
    write_json(d / "notch_values.json", all_values)
    run.results["samples"] = samples
    return "; ".join(lines)


def _crop_around(vol: RasVolume, pts, margin_mm: float) -> RasVolume:
    """The part of ``vol`` around the RAS points ``pts`` grown by ``margin_mm`` (a copy)."""
    from TrajectoryPlannerLib.planning.risk import crop_volume

    ijk = vol.ras_to_ijk_points(np.asarray(pts, float))
    pad = margin_mm / vol.spacing
    lo = np.maximum(np.floor(ijk.min(axis=0) - pad).astype(int), 0)
    hi = np.minimum(np.ceil(ijk.max(axis=0) + pad).astype(int) + 1, np.array(vol.array.shape[::-1]))
    out = crop_volume(vol, lo[::-1], hi[::-1])
    out.array = np.ascontiguousarray(out.array)
    return out


def _stage_record(run: CaseRun, progress, should_cancel) -> str:
    from SmartBiopsyLib.records.procedure_log import ProcedureLog
    from SmartBiopsyLib.records.specimen_journal import SpecimenJournal, SpecimenRecord, values_from_notch

    if not (run.options.demo_confirmation and run.inputs.synthetic):
        return _record_user_case(run)
    d = run.out / "specimens"
    d.mkdir(parents=True, exist_ok=True)
    journal_path = d / "journal.jsonl"
    if journal_path.exists():
        journal_path.unlink()  # a fresh run of the demo records a fresh procedure
        for extra in d.glob("journal*"):
            extra.unlink()
    journal = SpecimenJournal(journal_path)
    # the simulated procedure ends before the run writes its report: it starts 15 + 8 min per pot ago
    now = (_dt.datetime.now(_dt.timezone.utc)
           - _dt.timedelta(minutes=15 + 8 * len(run.results["samples"]))).replace(microsecond=0)
    participant = run.inputs.name
    for n, (t, det, roi, vals) in enumerate(run.results["samples"]):
        values = values_from_notch(vals)
        rec = SpecimenRecord(pot_id=f"{participant}-POT-{t.target}", region=t.region or t.target,
                             target_name=t.target, needle_tip_ras=list(map(float, det.tip_ras)),
                             needle_direction_ras=list(map(float, det.axis)), notch_roi=roi.to_dict(),
                             values=values, operator=run.options.operator,
                             time_utc=(now + _dt.timedelta(minutes=12 + 8 * n)).isoformat(),
                             participant_id=participant,
                             notes="simulated confirmation CT (phantom demo)" if run.inputs.synthetic else "")
        journal.append_specimen(rec)
    journal.export_csv(d / "specimens.csv")
    log = ProcedureLog(participant_id=participant, operator=run.options.operator)
    log.set_planning_topogram(now.isoformat())
    if run.inputs.synthetic:
        # the demo's dose record is a plausible simulated one and is labelled so in the report
        log.add_scan("planning CT (simulated)", (now + _dt.timedelta(minutes=2)).isoformat(), 420.0)
        for n, (t, *_rest) in enumerate(run.results["samples"]):
            log.add_scan(f"confirmation CT {t.target} (simulated)",
                         (now + _dt.timedelta(minutes=11 + 8 * n)).isoformat(), 38.0)
            log.add_manipulation(t.region or t.target, 2)
    write_json(d / "procedure.json", log.to_dict())
    journal.append_procedure(log)
    if run.options.synthetic_pathology and run.inputs.synthetic:
        _write_synthetic_pathology(run, d / "pathology.csv")
        journal.import_pathology_csv(d / "pathology.csv")
        journal.export_csv(d / "specimens.csv")
    return f"{len(run.results['samples'])} simulated specimen pots recorded (phantom demo)"


def _record_user_case(run: CaseRun) -> str:
    """A user's case: the workflow records no pot, no procedure log and no pathology; the operator records
    each pot (``smartbiopsy specimens add --from-sampling <out>/sampling/<target>``, pre-filled from the
    measured needle and notch values)."""
    samples = run.results.get("samples") or []
    targets = ", ".join(t.target for t, *_ in samples) or "none"
    return (f"no specimen pots recorded by the workflow (measured targets: {targets}); the operator records each "
            f"pot with 'smartbiopsy specimens add --journal J --from-sampling {(run.final_out or run.out) / 'sampling'}/<target> "
            "--pot-id ID --operator NAME'")


def _write_synthetic_pathology(run: CaseRun, path: Path) -> None:
    """Demo only: Ki-67 from a documented toy model of the phantom (denser tissue, lower ADC, more Ki-67).

    Ki-67 % = clip(55 - 0.025 x ADC_notch + N(0, 2)); labelled synthetic everywhere it appears.
    """
    rng = np.random.default_rng(run.options.seed + 5)
    lines = ["pot_id,ki67_percent,fnclcc_grade"]
    for t, det, roi, vals in run.results["samples"]:
        adc = vals.maps["adc"].mean
        ki = float(np.clip(55 - 0.025 * adc + rng.normal(0, 2), 1, 90))
        grade = 3 if ki > 25 else (2 if ki > 10 else 1)
        lines.append(f"{run.inputs.name}-POT-{t.target},{ki:.1f},{grade}")
    path.write_text("\n".join(lines) + "\n")


def _stage_scene(run: CaseRun, progress, should_cancel) -> str:
    from SmartBiopsyCoreLib.runtime import new_runtime
    from SmartBiopsyCoreLib.dataio.scene_io import save_scene_bundle
    from SmartBiopsyLib.scene_build import build_case_scene

    _start_background_export(run, records_written=True)  # normally started with the plan step
    _wait_skin_model(run)  # the plan's skin map (and skin_model.vtp) before the scene and the report figures use it
    _start_report_sections(run)
    rt = new_runtime()
    counts = build_case_scene(rt.scene, run)
    progress(0.6, "saving scene bundle")
    save_scene_bundle(rt.scene, run.out / "scene.mrb", rt.app_logic)
    write_json(run.out / "scene_nodes.json", counts)
    return f"scene.mrb with {sum(counts.values())} nodes"


def _stage_report(run: CaseRun, progress, should_cancel) -> str:
    from SmartBiopsyLib.report.writer import write_report

    run.write_summary()
    if run.options.export:
        _export_for_hospital(run)
    _finish_report_facts(run)
    job = run.background.pop("report_sections", None)  # started with the scene step (_start_report_sections)
    path = write_report(run.out, drawn=job.result() if job is not None else None)
    return f"report {Path(path).name}"


def _finish_report_facts(run: CaseRun) -> None:
    """Measure the total time and peak memory once (:meth:`CaseRun.finish_facts`) and write them with the report
    step shown as done (the report exists when anyone reads it), taking the time since the previous steps, so
    that the report's step table adds up to the total."""
    facts = run.finish_facts()
    rec = run.stages[-1] if run.stages and run.stages[-1].name == "report" else None
    if rec is not None:
        rec.status, rec.message = "done", "report.html written (its own writing time is not in the total)"
        rec.seconds = max(0.0, facts["total_seconds"] - sum(s.seconds for s in run.stages[:-1]))
    run.write_summary()


# ====================================================================== hospital export (called by the report stage)
def _export_for_hospital(run: CaseRun) -> None:
    """DICOM SEG / Parametric Maps / TID 1500 SR and FHIR Specimens into ``<out>/export`` before the report lists
    them. Never fails the run: a missing library or a problem becomes one line in the summary."""
    from SmartBiopsyLib.export.case import export_case_line

    started = run.background.pop("export", None)  # started with the plan step (_start_background_export)
    done = started.result() if started is not None else None
    line, warning = done if done is not None else export_case_line(run.out, run.inputs.risk_labelmaps,
                                                                   run.options.export_accession)
    if warning is not None:
        logger.warning("hospital export skipped: %s", warning)
    run.lines.append(line)
    run.write_summary()


# ====================================================================== overlapped work
# Work that does not depend on the step before it starts early in a worker, and the step that owns it takes the
# result: its outputs, messages and failures appear in that step exactly as when it runs there. Inside the Slicer
# application, or with SMARTBIOPSY_SERIAL=1, every step runs in order in the calling thread.
def _start_background_export(run: CaseRun, records_written: bool) -> None:
    """The hospital export in a child process: started with the plan step when the characterisation wrote its
    habitat map (segmentations and parametric maps are written while the plan, robot and sampling steps run),
    released by the scene step (``records_written``: targets, plan, needles and specimens are all written) for
    the rest; the report step takes its result."""
    if not run.options.export:
        return
    if "export" not in run.background:
        from SmartBiopsyLib.background import ChildJob, process_allowed

        if not process_allowed() or not (records_written or (run.out / "characterisation" / "habitats.nrrd").is_file()):
            return
        _no_import_under_way(run)
        try:
            run.background["export"] = ChildJob(
                "SmartBiopsyLib.export.case:export_case_line",
                (str(run.out), run.inputs.risk_labelmaps, run.options.export_accession),
                outputs=[run.out / "export"], gated=True, name="export")
        except Exception as exc:  # noqa: BLE001 - no child process here: the report step exports itself
            logger.info("hospital export in the run's own process (%s)", exc)
            return
    if records_written:
        run.background["export"].release()


class _Steps:
    """What a sequence of steps produced (``value``) and the exception that stopped it with the step it stopped at;
    :meth:`raise_at` re-raises that exception where the serial code would have raised it."""

    def __init__(self):
        self.value: dict = {}
        self.error: BaseException | None = None
        self.error_at: str | None = None

    def raise_at(self, step: str) -> None:
        if self.error is not None and self.error_at == step:
            raise self.error


class _ThreadCall:
    """``func()`` in a daemon worker thread (for calls that release the interpreter lock: SimpleITK, VTK);
    :meth:`wait` returns its value or raises its error as the call would have. Where workers are not used
    (:func:`SmartBiopsyLib.background.process_allowed`) the call runs at once and raises there."""

    def __init__(self, func, name: str):
        import threading

        from SmartBiopsyLib.background import process_allowed

        self.value = None
        self._error: BaseException | None = None
        self._thread = None
        if not process_allowed():
            self.value = func()
            return

        def call():
            try:
                self.value = func()
            except BaseException as exc:  # noqa: BLE001 - raised by wait()
                self._error = exc

        self._thread = threading.Thread(target=call, name=f"smartbiopsy-{name}", daemon=True)
        self._thread.start()

    def _join(self) -> None:
        if self._thread is not None:
            try:
                while self._thread.is_alive():
                    self._thread.join(0.05)  # short waits: the main thread stays where Ctrl-C is handled
            finally:
                self._thread.join()  # never end the process while ITK or VTK writes

    def wait(self):
        self._join()
        if self._error is not None:
            raise self._error
        return self.value


class _ImageWrite(_ThreadCall):
    """``save_image(volume, path)`` in a worker thread (SimpleITK compresses without the interpreter lock)."""

    def __init__(self, volume: RasVolume, path: Path):
        from SmartBiopsyCoreLib.dataio.imageio import save_image

        super().__init__(lambda: save_image(volume, path), "write")

    def wait(self, drop_on_error=()) -> None:
        """Wait for the write; on its error remove ``drop_on_error`` (files written meanwhile that the serial
        order would not have written) and raise it."""
        self._join()
        if self._error is not None:
            for p in drop_on_error:
                Path(p).unlink(missing_ok=True)
        super().wait()


class _SkinModelJob(_ThreadCall):
    """The plan step's skin map (``skinmap.skin_model`` and ``skin_model.vtp``) built in a worker thread (VTK
    releases the interpreter lock) while the calibrate, robot and sample steps run; serial where workers are not
    used. A plan without skin data is refused at once in the plan step, as before; an error of the surface itself
    is raised where the map is first used (:func:`_wait_skin_model`); :meth:`wait` returns the vtkPolyData."""

    def __init__(self, result, path: Path):
        from TrajectoryPlannerLib.planning.skinmap import check_skin_data

        check_skin_data(result)

        def build():
            from TrajectoryPlannerLib.planning.skinmap import skin_model, write_skin_model

            poly = skin_model(result)
            write_skin_model(poly, path)
            return poly

        super().__init__(build, "skin-map")


def _wait_skin_model(run: CaseRun, raise_error: bool = True) -> None:
    """Take the plan step's skin map into ``run.results["skin_poly"]`` (waiting for its worker)."""
    job = run.results.pop("skin_model_job", None)
    if job is None:
        return
    try:
        run.results["skin_poly"] = job.wait()
    except Exception as exc:  # noqa: BLE001 - said in the step that uses the map
        if raise_error:
            raise SmartBiopsyError(f"the plan's skin map could not be built ({_sentence(exc)})") from exc
        logger.error("the plan's skin map could not be built: %s", exc)


class _Worker:
    """Steps run in a daemon thread (SimpleITK and numpy release the interpreter lock in their heavy calls).
    :meth:`result` waits for them; :meth:`cancel` asks them to stop at their next step and waits."""

    def __init__(self, func, name: str):
        import threading

        self.stop = threading.Event()
        self._out: _Steps | None = None
        self._thread = threading.Thread(target=self._run, args=(func,), name=f"smartbiopsy-{name}", daemon=True)
        self._thread.start()

    def _run(self, func) -> None:
        self._out = func(self.stop)

    def result(self) -> _Steps:
        while self._thread.is_alive():
            self._thread.join(0.05)  # short waits: the main thread stays where Ctrl-C is handled
        return self._out

    def cancel(self) -> None:
        self.stop.set()
        self._thread.join()  # a thread must not be inside ITK when the process ends


def _start_characterisation_inputs(run: CaseRun, should_cancel) -> None:
    """Maps, tumour on the map grid, habitats and radiomics need only the MRI: computed while the fusion runs
    (the characterise step takes them, writes them and raises their errors where it would have)."""
    i = run.inputs
    if i.targets_ct or "characterisation_inputs" in run.background:
        return
    from SmartBiopsyLib.background import process_allowed

    if process_allowed():  # same rule as for processes: not inside the Slicer application, not SMARTBIOPSY_SERIAL
        run.background["characterisation_inputs"] = _Worker(
            lambda stop: _compute_characterisation_inputs(run, lambda: stop.is_set() or should_cancel(), stop),
            "characterise")


def _characterisation_inputs(run: CaseRun, should_cancel) -> _Steps:
    """The result of :func:`_start_characterisation_inputs`, or the same computed now in this thread."""
    job = run.background.pop("characterisation_inputs", None)
    return job.result() if job is not None else _compute_characterisation_inputs(run, should_cancel)


def _compute_characterisation_inputs(run: CaseRun, should_cancel, stop=None) -> _Steps:
    """Steps "maps" (ADC, FF, EF on one grid, tumour checked and on that grid), "habitats" (tumour size, habitat
    map) and "radiomics"; nothing is written and nothing raised (:class:`_Steps`). ``stop``: an Event that ends
    the steps early (the run will not use them)."""
    from SmartBiopsyLib.characterise.habitats import compute_habitats
    from SmartBiopsyLib.characterise.maps import compute_adc, compute_ef, compute_ff, to_common_grid
    from SmartBiopsyLib.characterise.radiomics import compute_radiomics
    from SmartBiopsyLib.characterise.tumour import measure_tumour

    i = run.inputs
    out = _Steps()
    v = out.value
    v["lines"] = []
    step = "maps"
    try:
        adc = i.adc if i.adc is not None else (compute_adc(i.dwi) if i.dwi else None)
        if adc is None:
            raise InputDataError("no DWI (two or more b-values) and no ADC map were given; pass --dwi or --adc")
        ff = i.ff if i.ff is not None else (compute_ff(i.dixon_water, i.dixon_fat)
                                            if i.dixon_water is not None and i.dixon_fat is not None else None)
        ef = i.ef if i.ef is not None else (compute_ef(i.t1_pre, i.t1_post)
                                            if i.t1_pre is not None and i.t1_post is not None else None)
        if ef is None and i.dce is not None:
            from SmartBiopsyLib.characterise.maps import compute_ef_dynamic
            ef = compute_ef_dynamic(i.dce.frames, i.dce.times_s, baseline_frames=run.options.dce_baseline_frames,
                                    post_time_s=run.options.dce_post_time_s)
            v["lines"].append(f"EF from the DCE: {ef.meta['dynamic_sentence']}")
        if ef is None:
            raise InputDataError("no pre/post-contrast T1, DCE or EF map were given; pass --t1-pre and --t1-post, "
                                 "--dce or --ef")
        moved, grids = to_common_grid({"ef": ef, "ff": ff}, adc, i.map_transforms)
        ef, ff = moved["ef"], moved.get("ff")
        for name, how in grids.items():
            if how != "same grid":
                v["lines"].append(f"{name.upper()} {how} onto the ADC grid")
        if i.tumour is None:
            raise InputDataError("no tumour segmentation was given; pass --tumour (a label map on the MRI grid)")
        tumour = i.tumour
        if not np.any(tumour.array):
            raise InputDataError("the tumour segmentation is empty; segment the tumour first")
        if not tumour.same_grid(adc):
            # a tumour drawn on another MRI grid: bring it onto the map grid (same MRI world)
            from SmartBiopsyCoreLib.geometry import resample
            lo, hi = tumour.bounds_ras()
            alo, ahi = adc.bounds_ras()
            if np.any(hi < alo) or np.any(lo > ahi):
                raise InputDataError("the tumour segmentation lies outside the MRI maps; check it was drawn on this MRI")
            tumour = resample(tumour, adc, None, order=0)
            if not np.any(tumour.array):
                raise InputDataError("the tumour segmentation lies outside the MRI maps; check it was drawn on this MRI")
        maps = {"adc": adc, "ef": ef}
        if ff is not None:
            maps["ff"] = ff
        v.update(adc=adc, ef=ef, ff=ff, tumour=tumour, maps=maps)
        if stop is not None and stop.is_set():
            return out
        step = "habitats"
        v["size"] = measure_tumour(tumour)
        v["habitats"] = compute_habitats(adc, ef, ff, tumour, should_cancel=should_cancel)
        if stop is not None and stop.is_set():
            return out
        step = "radiomics"
        v["radiomics"] = compute_radiomics(v["habitats"].labels, maps)
    except BaseException as exc:  # noqa: BLE001 - raised by the characterise step at this step (raise_at)
        out.error, out.error_at = exc, step
    return out


def _start_robot_frame_fit(run: CaseRun) -> None:
    """The robot's fiducial frame is found and fitted in the planning CT alone: done while the fusion runs (the
    calibrate step adds the errors at the planned targets and the QA, writes the files and raises its errors)."""
    from SmartBiopsyLib.background import process_allowed

    if run.options.robot_frame_model and "robot_frame_fit" not in run.background and process_allowed():
        run.background["robot_frame_fit"] = _Worker(
            lambda stop: _compute_robot_frame_fit(run, lambda: stop.is_set()), "calibrate")


def _robot_frame_fit(run: CaseRun, should_cancel, progress) -> _Steps:
    """The result of :func:`_start_robot_frame_fit`, or the same computed now in this thread."""
    job = run.background.pop("robot_frame_fit", None)
    if job is not None:
        return job.result()
    return _compute_robot_frame_fit(run, should_cancel, lambda f, m: progress(0.8 * f, m))


def _compute_robot_frame_fit(run: CaseRun, should_cancel, progress=None) -> _Steps:
    """Step "fit": the frame model (``RunOptions.robot_frame_model``) and its fit in the planning CT
    (:func:`TrajectoryPlannerLib.calibration.frame_fit.fit_frame`); nothing is written and nothing raised."""
    from SmartBiopsyCoreLib.fiducial_frames.model import load_model
    from TrajectoryPlannerLib.calibration.frame_fit import fit_frame

    out = _Steps()
    try:
        out.value["model"] = load_model(run.options.robot_frame_model)
        out.value["fit"] = fit_frame(run.inputs.ct, out.value["model"], progress=progress, should_cancel=should_cancel)
    except BaseException as exc:  # noqa: BLE001 - raised by the calibrate step (raise_at)
        out.error, out.error_at = exc, "fit"
    return out


#: modules the later steps import (landmark matching, fusion and report figures, skin model, scene), imported by a
#: worker while the fusion registers; the first import of each takes 0.3-1.5 s on the main path otherwise
PRELOAD_MODULES = ("scipy.optimize", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.patches",
                   "vtk", "vtk.util.numpy_support", "scipy.spatial", "slicer")


def _start_preload(run: CaseRun) -> None:
    """Import :data:`PRELOAD_MODULES` in a worker thread (a module that is missing is left to the step that needs
    it, which says so as before). Nothing runs inside the Slicer application (everything is imported there)."""
    from SmartBiopsyLib.background import process_allowed

    if "preload" in run.background or not process_allowed():
        return

    def preload(stop):
        import importlib

        for name in PRELOAD_MODULES:
            if stop.is_set():
                break
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - ImportError and friends: the step that needs it reports it
                logger.debug("preloading %s failed", name, exc_info=True)
        return _Steps()

    run.background["preload"] = _Worker(preload, "preload")


def _no_import_under_way(run: CaseRun) -> None:
    """Wait for the preloading worker to end before a child process is forked: a module being imported holds its
    import lock, and a forked child that imports the same module would wait for it forever (the thread that holds
    it does not exist in the child). The preload ends seconds before the first child in practice."""
    job = run.background.get("preload")
    if job is not None:
        job.result()


def _start_report_sections(run: CaseRun) -> None:
    """The report sections that read only what the steps up to 'record' wrote (fusion, habitats, trajectories,
    notch, procedure, heterogeneity; ``report.writer.EARLY_SECTIONS``), drawn in a child process while the scene
    is built; the report step writes the report with them (and draws them itself if the child failed)."""
    from SmartBiopsyLib.background import ChildJob, process_allowed

    if "report_sections" in run.background or not process_allowed():
        return
    _no_import_under_way(run)
    try:
        run.background["report_sections"] = ChildJob("SmartBiopsyLib.report.writer:draw_sections", (str(run.out),),
                                                      outputs=[run.out / "figures"], name="report figures")
    except Exception as exc:  # noqa: BLE001 - no child process here: the report step draws every section
        logger.info("report figures in the run's own process (%s)", exc)


def _end_background(run: CaseRun) -> None:
    """End the work no step took (the run failed, stopped or was interrupted before): nothing of it is kept."""
    for key in list(run.background):
        job = run.background.pop(key)
        try:
            job.cancel()
        except Exception:  # noqa: BLE001 - never hide the run's own outcome behind a cleanup problem
            logger.debug("ending the background %s failed", key, exc_info=True)

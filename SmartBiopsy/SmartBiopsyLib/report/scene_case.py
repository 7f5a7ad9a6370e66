"""The case folder written from a Slicer scene (the panel's "Generate report"), in the command line's layout.

The command line's workflow (:mod:`SmartBiopsyLib.workflow`) writes the case folder stage by stage; the
report (:mod:`SmartBiopsyLib.report.writer`) reads only that folder. In the desktop application the same
results live in MRML nodes, so this module writes the same files from them:

    summary.json                 stages found in the scene (done / not run), case description
    inputs/                      ct.nrrd (planning CT), mri_t2.nrrd (the MRI used for fusion)
    registration/                fusion.json (matrix + QA), qa.json, mri_to_ct.json, t2_on_ct.nrrd
    characterisation/            adc/ff/ef.nrrd, tumour.nrrd, habitats.nrrd (MRI grid), regions.csv,
                                 targets.json (point_ras: MRI world, point_ct_ras: CT world), characterisation.json
    plan/                        plan.json (from the planner's trajectory line nodes), skin_model.vtp
    sampling/<target>/           needle.json, notch.json; sampling/notch_values.json
    specimens/                   journal.jsonl (copy), specimens.csv, procedure.json

MRML-glue layer: takes the scene and nodes explicitly; no ``slicer.app``/``slicer.mrmlScene``/qt.
Anything the scene does not hold is not written, and the report says "not available" for it.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from SmartBiopsyCoreLib.errors import InputDataError

logger = logging.getLogger(__name__)

#: Attribute prefix of the planner's trajectory line nodes (TrajectoryPlannerLib.planning.mrml).
PLANNER_ATTR = "TrajectoryPlanner."


@dataclass
class SceneCase:
    """The nodes and session results a case folder is written from (any may be None)."""

    name: str = "case"
    ct: object = None                   # planning CT volume node (HU)
    mri: object = None                  # anatomical MRI volume node used for fusion
    transform: object = None            # MRI -> CT linear transform node (Registration Fusion)
    maps: dict = field(default_factory=dict)      # "adc"/"ff"/"ef" -> volume node (MRI world)
    tumour: object = None               # label RasVolume on the ADC grid
    habitats: object = None             # HabitatResult of this session
    targets: list = field(default_factory=list)   # characterise.targets.Target of this session
    tumour_size: object = None
    trajectories: list = field(default_factory=list)   # planner line nodes
    skin_model: object = None           # planner skin model node
    samples: dict = field(default_factory=dict)   # target -> (NeedleDetection, NotchROI, NotchValues)
    journal_path: object = None
    procedure_log: object = None


def module_parameter_node(scene, module: str):
    """The parameter node another module keeps in the scene (``vtkMRMLScriptedModuleNode``, singleton tag =
    module name, as ``ScriptedLoadableModuleLogic.getParameterNode`` creates it), or None."""
    node = scene.GetSingletonNode(module, "vtkMRMLScriptedModuleNode")
    if node is not None:
        return node
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
        n = scene.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
        if n.GetAttribute("ModuleName") == module:
            return n
    return None


def trajectory_nodes(scene) -> list:
    """The planner's trajectory line nodes in the scene (shared-entry fan and plans replaced by a newer one
    excluded), in scene order."""
    out = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsLineNode")):
        n = scene.GetNthNodeByClass(i, "vtkMRMLMarkupsLineNode")
        if n.GetAttribute(PLANNER_ATTR + "Rank") is not None and n.GetAttribute(PLANNER_ATTR + "SharedEntry") != "1" \
                and n.GetAttribute(PLANNER_ATTR + "Superseded") != "1":
            out.append(n)
    return out


def case_from_parameter_node(scene, pn, state, ct=None, mri=None) -> SceneCase:
    """Collect the case from the Smart Biopsy parameter node ``pn``, the panel state and the scene: the CT and
    the fusion MRI come from the Registration Fusion parameter node when not given, the trajectories from the
    planner's line nodes."""
    fusion_pn = module_parameter_node(scene, "RegistrationFusion")
    if fusion_pn is not None:
        ct = ct or fusion_pn.GetNodeReference("ctVolume")
        mri = mri or fusion_pn.GetNodeReference("mriVolume")
    tumour = None
    if getattr(pn, "tumourSegmentation", None) is not None and pn.tumourSegmentId and pn.adcMap is not None:
        from SmartBiopsyLib.logic import BiopsyLogic

        tumour = BiopsyLogic(scene).tumour_mask(pn.tumourSegmentation, pn.tumourSegmentId, pn.adcMap)
    skin = None
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLModelNode")):
        n = scene.GetNthNodeByClass(i, "vtkMRMLModelNode")
        if n.GetAttribute(PLANNER_ATTR + "SkinScalar") is not None:
            skin = n
    journal = pn.journalPath if str(pn.journalPath) not in ("", ".") else None
    return SceneCase(name=pn.participantId or "case", ct=ct, mri=mri, transform=pn.registrationTransform,
                     maps={"adc": pn.adcMap, "ff": pn.ffMap, "ef": pn.efMap}, tumour=tumour,
                     habitats=state.habitats, targets=list(state.targets), tumour_size=state.tumour_size,
                     trajectories=trajectory_nodes(scene), skin_model=skin, samples=dict(state.samples),
                     journal_path=journal, procedure_log=state.procedure_log)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def write_json(path: Path, data) -> Path:
    """JSON as the workflow writes it (numpy values as lists/numbers, written atomically). The workflow module
    itself is not imported here: it needs the POSIX-only ``resource`` module, and this runs in desktop Slicer."""
    from SmartBiopsyCoreLib.dataio.jsonio import write_json as _write_json

    return _write_json(path, data)


def _matrix(transform_node):
    if transform_node is None:
        return None
    from RegistrationFusionLib.registration.mrml import matrix_from_transform_node

    return matrix_from_transform_node(transform_node)


def _trajectory_dict(node) -> dict:
    from SmartBiopsyLib.logic import TIP_BEYOND_TARGET_ATTRIBUTE, line_points, planned_tip

    a = lambda k, default=None: node.GetAttribute(PLANNER_ATTR + k) or default  # noqa: E731
    entry, target = line_points(node)
    tip = planned_tip(node).round(3).tolist() if node.GetAttribute(TIP_BEYOND_TARGET_ATTRIBUTE) else None
    clearance = {}
    for name in node.GetAttributeNames() or ():
        if name.startswith(PLANNER_ATTR + "ClearanceMM."):
            clearance[name[len(PLANNER_ATTR + "ClearanceMM."):]] = float(node.GetAttribute(name))
    return {"name": a("Name", node.GetName()), "target": a("Target", node.GetName()), "region": a("Region", ""),
            "entry_ras": entry.round(3).tolist(), "target_ras": target.round(3).tolist(), "tip_ras": tip,
            "needle": a("Needle", ""), "length_mm": float(a("LengthMM", np.linalg.norm(target - entry))),
            "clearance_mm": clearance, "angle_to_axial_deg": float(a("AngleToAxialDeg", "nan")),
            "score": float(a("Score", "nan")), "rank": int(a("Rank", "1"))}


def write_case_folder(case: SceneCase, folder, progress=None) -> dict:
    """Write ``case`` into ``folder`` in the command line's layout; returns {stage: "done" | "not run"}."""
    from SmartBiopsyCoreLib.dataio.imageio import save_image
    from SmartBiopsyCoreLib.dataio.transforms import write_transform_json
    from SmartBiopsyCoreLib.dataio.volumes_mrml import volume_from_node

    out = Path(folder)
    if str(folder) in ("", "."):
        raise InputDataError("choose a report folder first")
    out.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda f, m: None)
    done: dict[str, str] = {}
    m = _matrix(case.transform)

    report(0.05, "inputs")
    ct = volume_from_node(case.ct) if case.ct is not None else None
    mri = volume_from_node(case.mri) if case.mri is not None else None  # its own (MRI world) geometry
    if ct is not None:
        save_image(ct, out / "inputs" / "ct.nrrd", compress=False)
    if mri is not None:
        save_image(mri, out / "inputs" / "mri_t2.nrrd", compress=False)
    done["load"] = "done" if ct is not None else "not run"

    report(0.2, "registration")
    if m is not None:
        import json

        d = out / "registration"
        d.mkdir(parents=True, exist_ok=True)
        qa = json.loads(case.transform.GetAttribute("SmartBiopsy.RegistrationQA") or "null")
        approved = case.transform.GetAttribute("SmartBiopsy.RegistrationApproved") == "true"
        write_transform_json(d / "mri_to_ct.json", m, "Registration Fusion (Slicer scene)")
        write_json(d / "fusion.json", {"matrix_mri_to_ct_ras": m, "qa": qa, "approved": approved})
        if qa is not None:
            write_json(d / "qa.json", qa)
        if ct is not None and mri is not None:
            from SmartBiopsyCoreLib.geometry import resample

            save_image(resample(mri, ct, m), d / "t2_on_ct.nrrd")
        done["fuse"] = "done"
    else:
        done["fuse"] = "not run"

    report(0.4, "characterisation")
    d = out / "characterisation"
    d.mkdir(parents=True, exist_ok=True)
    maps = {k: volume_from_node(n) for k, n in case.maps.items() if n is not None}
    for k, v in maps.items():
        save_image(v, d / f"{k}.nrrd")
    if case.tumour is not None:
        save_image(case.tumour, d / "tumour.nrrd")
    if case.habitats is not None:
        from SmartBiopsyLib.characterise.habitats import write_regions_csv

        save_image(case.habitats.labels, d / "habitats.nrrd")
        write_regions_csv(case.habitats, d / "regions.csv")
    if case.targets:
        tdicts = []
        for t in case.targets:
            td = t.to_dict()
            if m is not None:
                p = np.append(np.asarray(t.point_ras, float), 1.0)
                td["point_ct_ras"] = (m @ p)[:3].tolist()
            tdicts.append(td)
        write_json(d / "targets.json", {"targets": tdicts, "frame": "point_ras: MRI world; point_ct_ras: CT world"})
        write_json(d / "characterisation.json", {
            "tumour": case.tumour_size.to_dict() if case.tumour_size is not None else None,
            "habitats": case.habitats.to_dict() if case.habitats is not None else None, "targets": tdicts})
    done["characterise"] = "done" if (case.habitats is not None and case.targets) else "not run"

    report(0.6, "plan")
    if case.trajectories:
        trajs = [_trajectory_dict(n) for n in case.trajectories]
        write_json(out / "plan" / "plan.json", {"trajectories": trajs, "source": "Trajectory Planner (Slicer scene)"})
        if case.skin_model is not None and case.skin_model.GetPolyData() is not None:
            from TrajectoryPlannerLib.planning.skinmap import write_skin_model

            write_skin_model(case.skin_model.GetPolyData(), out / "plan" / "skin_model.vtp")
        done["plan"] = "done"
    else:
        done["plan"] = "not run"

    report(0.75, "sampling")
    if case.samples:
        all_values = {}
        for name, (det, roi, vals) in case.samples.items():
            td = out / "sampling" / str(name)
            write_json(td / "needle.json", {"detection": det.to_dict()})
            write_json(td / "notch.json", {"roi": roi.to_dict(), "values": vals.to_dict()})
            all_values[name] = vals.to_dict()
        write_json(out / "sampling" / "notch_values.json", all_values)
        done["sample"] = "done"
    else:
        done["sample"] = "not run"

    report(0.85, "specimens")
    d = out / "specimens"
    recorded = False
    if case.journal_path is not None and Path(case.journal_path).is_file():
        from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

        d.mkdir(parents=True, exist_ok=True)
        if Path(case.journal_path).resolve() != (d / "journal.jsonl").resolve():
            shutil.copyfile(case.journal_path, d / "journal.jsonl")
        with SpecimenJournal(case.journal_path, create=False) as journal:
            journal.export_csv(d / "specimens.csv")
        recorded = True
    if case.procedure_log is not None:
        write_json(d / "procedure.json", case.procedure_log.to_dict())
        recorded = True
    done["record"] = "done" if recorded else "not run"

    stages = [{"name": k, "status": v, "seconds": 0.0,
               "message": "" if v == "done" else "not done in this Slicer scene"} for k, v in done.items()]
    write_json(out / "summary.json", {"case": {"name": case.name, "source": "3D Slicer scene", "synthetic": False},
                                      "stages": stages, "lines": []})
    report(1.0, "case folder written")
    return done

"""Self-test scenarios of the SmartBiopsy module (shared by Slicer's self-test and headless pytest).

Each ``scenario_*(scene) -> dict`` builds small synthetic data, runs the Lib functions the module's Logic
calls (core algorithms and MRML glue) on the given MRML scene, asserts the results and returns the
measured numbers. Units: RAS mm; ADC 1e-6 mm^2/s; FF and EF percent; HU for CT.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid

logger = logging.getLogger(__name__)

#: synthetic compartments: (habitat code, ADC 1e-6 mm^2/s, EF %) - A, two discordant B parts, C
COMPARTMENTS = ((1, 850.0, 140.0), (2, 1000.0, 35.0), (2, 1700.0, 110.0), (3, 1950.0, 25.0))
B_VALUES = (0.0, 400.0, 800.0)


def synthetic_tumour(spacing_mm: float = 2.0, radius_mm: float = 36.0, seed: int = 0) -> dict:
    """A spherical tumour split into four equal quadrants (A, B, B, C) on a small MRI-like grid.

    Returns {"grid": RasVolume template, "truth": habitat labels (1 A, 2 B, 3 C), "mask": bool array,
    "dwi": {b: RasVolume}, "water"/"fat"/"t1_pre"/"t1_post": RasVolume, "adc"/"ef"/"ff": true values}.
    """
    rng = np.random.default_rng(seed)
    n = int(2 * (radius_mm + 12.0) / spacing_mm)
    origin = np.array([-(n - 1) * spacing_mm / 2.0, -(n - 1) * spacing_mm / 2.0, -(n - 1) * spacing_mm / 2.0])
    m = make_grid(origin, (spacing_mm,) * 3, (n, n, n))
    grid = RasVolume(np.zeros((n, n, n), np.float32), m, "grid")
    kk, jj, ii = np.indices((n, n, n))
    p = grid.ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1)).reshape(n, n, n, 3)
    r = np.linalg.norm(p, axis=3)
    mask = r <= radius_mm
    quadrant = (p[..., 0] >= 0).astype(int) * 2 + (p[..., 1] >= 0).astype(int)
    truth = np.zeros((n, n, n), np.uint8)
    adc = np.full((n, n, n), 1500.0)
    ef = np.full((n, n, n), 60.0)
    for q, (code, a, e) in enumerate(COMPARTMENTS):
        sel = mask & (quadrant == q)
        truth[sel], adc[sel], ef[sel] = code, a, e
    ff = np.where(mask, 2.0, 80.0)  # fatty body wall around the tumour (Dixon swap check looks there)
    s0 = np.where(r <= radius_mm + 10.0, 1000.0, 5.0)  # body around the tumour, air outside

    def vol(arr, name, **meta):
        return RasVolume(np.asarray(arr, np.float32), m.copy(), name, meta)

    def noisy(arr):
        return np.abs(arr + rng.normal(0.0, 4.0, arr.shape))

    dwi = {b: vol(noisy(s0 * np.exp(-b * adc * 1e-6)), f"dwi_b{int(b)}", b_value=b) for b in B_VALUES}
    pre = s0 * 0.5
    post = pre * (1.0 + ef / 100.0)
    return {"grid": grid, "truth": vol(truth.astype(np.uint8), "truth_habitats"), "mask": mask, "dwi": dwi,
            "water": vol(noisy(s0 * (1 - ff / 100.0)), "dixon_water"), "fat": vol(noisy(s0 * ff / 100.0), "dixon_fat"),
            "t1_pre": vol(noisy(pre), "t1_pre"), "t1_post": vol(noisy(post), "t1_post"),
            "adc": adc, "ef": ef, "ff": ff}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 1.0


def scenario_maps_and_habitats(scene) -> dict:
    """ADC/FF/EF computed from synthetic DWI, Dixon and T1 pre/post; habitats by the median rule; one
    target per region inside its true region; segmentation, table and fiducial nodes in the scene."""
    from SmartBiopsyLib.characterise import mrml as characterisation_mrml, habitats, maps, targets
    from SmartBiopsyCoreLib.dataio import volumes_mrml
    case = synthetic_tumour()
    mask = case["mask"]
    adc = maps.compute_adc(case["dwi"])
    ff = maps.compute_ff(case["water"], case["fat"])
    ef = maps.compute_ef(case["t1_pre"], case["t1_post"])
    core = mask
    for name, got, want in (("ADC", adc, case["adc"]), ("EF", ef, case["ef"])):
        rel = np.nanmedian(np.abs(np.asarray(got.array)[core] - want[core]) / want[core])
        assert rel < 0.05, f"{name} median relative error {rel:.3f} in the tumour"
    assert abs(np.nanmedian(np.asarray(ff.array)[mask]) - 2.0) < 1.5, "FF off in the tumour"

    res = habitats.compute_habitats(adc, ef, ff, mask, habitats.HabitatConfig(smooth_sigma_mm=0.0))
    lab = np.asarray(res.labels.array)
    truth = np.asarray(case["truth"].array)
    dice = {r: _dice(lab == c, truth == c) for r, c in habitats.REGION_CODES.items()}
    assert min(dice.values()) >= 0.8, f"habitat Dice {dice}"
    ts = targets.plan_targets(res.labels, {"adc": adc, "ef": ef, "ff": ff}, predicted_tre_mm=1.0)
    assert [t.region for t in ts] == ["A", "B", "C"], [t.region for t in ts]
    for t in ts:
        kji = np.round(case["truth"].ras_to_ijk_points(np.asarray(t.point_ras)[None])[0][::-1]).astype(int)
        assert truth[tuple(kji)] == habitats.REGION_CODES[t.region], f"target {t.region} outside its true region"
        assert t.depth_mm >= 5.0, f"target {t.region} only {t.depth_mm:.1f} mm deep"

    map_nodes = {k: volumes_mrml.add_volume_node(scene, v, k.upper()) for k, v in (("adc", adc), ("ff", ff), ("ef", ef))}
    nodes = characterisation_mrml.characterisation_nodes(scene, res, ts)
    seg = nodes["segmentation"].GetSegmentation()
    names = sorted(seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments()))
    assert names == ["A", "B", "C"], names
    fid = nodes["targets"]
    assert [fid.GetNthControlPointLabel(i) for i in range(fid.GetNumberOfControlPoints())] == ["A", "B", "C"]
    assert nodes["regions"].GetNumberOfRows() == 3
    back = volumes_mrml.volume_from_node(map_nodes["adc"])
    assert np.allclose(back.ijk_to_ras, adc.ijk_to_ras) and back.array.shape == adc.array.shape
    return {"dice": dice, "depth_mm": {t.region: t.depth_mm for t in ts},
            "thresholds": {k: float(v) for k, v in res.thresholds.items() if isinstance(v, (int, float))}}


def synthetic_ct(shape_kji=(50, 90, 90), spacing=(1.0, 1.0, 2.0)) -> RasVolume:
    """Soft-tissue block (40 HU) in air on a small CT grid (RAS mm, origin at the centre)."""
    nk, nj, ni = shape_kji
    origin = -0.5 * np.array([(ni - 1) * spacing[0], (nj - 1) * spacing[1], (nk - 1) * spacing[2]])
    arr = np.full(shape_kji, 40, np.int16)
    arr[:, :5, :] = -1000
    return RasVolume(arr, make_grid(origin, spacing, shape_kji), "confirmation CT", {"units": "HU"})


def scenario_sampling_record(scene) -> dict:
    """Needle found in a simulated confirmation CT; side-notch ROI values of a known map; a specimen pot
    recorded in the journal, exported to CSV, pathology imported back; procedure log kept."""
    from SmartBiopsyLib.sampling import needle, needle_sim, notch
    from SmartBiopsyLib.records import procedure_log
    from SmartBiopsyCoreLib.dataio import volumes_mrml
    from SmartBiopsyLib.records.specimen_journal import SpecimenJournal, SpecimenRecord

    ct = synthetic_ct()
    entry, target = np.array([-10.0, -40.0, -8.0]), np.array([5.0, 25.0, 6.0])
    sim = needle_sim.simulate_confirmation_ct(ct, entry, target, "15G/16G-16cm", lateral_error_mm=1.5,
                                              depth_error_mm=-1.0, seed=3)
    ct_node = volumes_mrml.add_volume_node(scene, sim.ct, "Confirmation CT")
    det = needle.detect_needle(volumes_mrml.volume_from_node(ct_node), entry, target, target_name="Target A",
                               needle="15G/16G-16cm")
    tip_err = float(np.linalg.norm(det.tip_ras - sim.truth.tip_ras))
    assert tip_err <= 1.0, f"tip found {tip_err:.2f} mm from the truth"
    assert abs(det.lateral_error_mm - 1.5) < 0.7, f"lateral error {det.lateral_error_mm:.2f} mm (truth 1.5)"

    roi = notch.notch_roi_from_detection(det, notch.SIDE_NOTCH, "15G/16G-16cm")
    adc_map = RasVolume(np.full(ct.array.shape, 900.0, np.float32), ct.ijk_to_ras.copy(), "adc",
                        {"units": "1e-6 mm^2/s"})
    vals = notch.sample_maps(roi, {"adc": adc_map})
    st = vals.maps["adc"]
    assert abs(st.mean - 900.0) < 0.03 * 900.0, f"notch ADC mean {st.mean}"
    assert st.coverage > 0.95

    folder = Path(tempfile.mkdtemp(prefix="smartbiopsy-journal-"))
    with SpecimenJournal(folder / "specimens.jsonl") as journal:
        rec = SpecimenRecord(
            pot_id="POT-A1", region="A", target_name="Target A", needle_tip_ras=det.tip_ras.tolist(),
            needle_direction_ras=det.axis.tolist(), notch_roi=roi.to_dict(),
            values={"adc": {"mean": st.mean, "median": st.median, "min": st.min, "sd": st.sd,
                            "n_voxels": int(st.voxels_touched), "volume_mm3": st.volume_mm3}},
            operator="self-test")
        journal.append_specimen(rec)
        log = procedure_log.ProcedureLog(participant_id="P001", operator="self-test")
        log.set_planning_topogram("2026-01-05T09:00:00Z")
        log.add_scan("planning CT", "2026-01-05T09:02:00Z", 450.0)
        log.add_scan("confirmation CT A", "2026-01-05T09:25:00Z", 120.0)
        log.add_manipulation("A", 2)
        journal.append_procedure(log)
        csv_path = journal.export_csv(folder / "pathology_request.csv")
        (folder / "results.csv").write_text("pot_id,ki67_percent\nPOT-A1,35\n")
        report = journal.import_pathology_csv(folder / "results.csv")
        assert "POT-A1" in journal.specimens and "POT-A1" in journal.pathology
    reopened = SpecimenJournal(folder / "specimens.jsonl", create=False)
    try:
        assert list(reopened.specimens) == ["POT-A1"], "journal did not replay the recorded pot"
    finally:
        reopened.close()
    assert csv_path.exists() and "POT-A1" in csv_path.read_text()
    assert log.total_dlp_mgy_cm == 570.0 and log.elapsed_min == 25.0
    return {"tip_error_mm": tip_err, "lateral_error_mm": float(det.lateral_error_mm),
            "notch_adc_mean": float(st.mean), "import": report.to_dict(), "journal": str(folder)}


def parameter_node(**values):
    """A stand-in for the module's parameter node with every field the panel logic reads (defaults as in
    SmartBiopsy.py); inside Slicer the real ``SmartBiopsyParameterNode`` is passed instead."""
    from types import SimpleNamespace

    fields = dict(dwiB1=None, dwiB2=None, dwiB3=None, dwiB1BValue=-1.0, dwiB2BValue=-1.0, dwiB3BValue=-1.0,
                  excludeLowB=False, tumourSegmentation=None, tumourSegmentId="", dixonWater=None, dixonFat=None,
                  t1Pre=None, t1Post=None, adcMap=None, ffMap=None, efMap=None, registrationTransform=None,
                  habitatMode="median", needleErrorMm=2.0, notchLengthMm=10.0, habitatSegmentation=None, targets=None,
                  confirmationCT=None, plannedTrajectory=None, needleModel="15G/16G-16cm", notchMode="side-notch",
                  notchShiftMm=0.0, journalPath=Path("."), potId="", operatorName="", participantId="", scanLabel="",
                  scanDlpMgyCm=0.0, reportFolder=Path("."))
    fields.update(values)
    return SimpleNamespace(**fields)


def gui_case(scene, folder) -> dict:
    """Every step of the desktop workflow through the panels' logic APIs (what the three widgets call), on the
    small abdomen CT and a synthetic MRI tumour: fusion on capsule points (approved), maps, tumour segment,
    habitats and targets, planned paths, a simulated confirmation CT for target A (simulated data, as in every
    self-test), notch values, one specimen pot and the procedure log. Returns the nodes, the parameter node
    stand-in and the panel logic (its state is what "Generate report" writes)."""
    import slicer

    from RegistrationFusionLib.logic import FusionLogic
    from RegistrationFusionLib.registration import mrml as registration_mrml
    from SmartBiopsyCoreLib.dataio import volumes_mrml
    from SmartBiopsyCoreLib.phantom import abdomen
    from SmartBiopsyLib.logic import BiopsyLogic
    from SmartBiopsyLib.sampling import needle_sim
    from TrajectoryPlannerLib import logic as planner

    folder = Path(folder)
    ct, _labels, _ = abdomen.make_abdomen(spacing=(3.0, 3.0, 4.0))
    ct_node = volumes_mrml.add_volume_node(scene, ct, "Planning CT")
    case = synthetic_tumour(spacing_mm=2.0, radius_mm=20.0)
    shift = np.asarray(abdomen.TUMOUR_CENTRE_RAS, float)  # MRI world -> CT world: a translation
    mri_node = volumes_mrml.add_volume_node(scene, case["t1_pre"], "MRI T1")
    # capsules on the anterior and left skin (CT world) and where the MRI saw them (MRI world)
    caps_ct = np.array([[-40.0, 108.0, -40.0], [-40.0, 108.0, 40.0], [-100.0, 92.0, 0.0], [-130.0, 60.0, -45.0],
                        [-130.0, 60.0, 45.0], [20.0, 109.0, 0.0]])
    ct_caps = registration_mrml.create_capsule_fiducials(scene, caps_ct, "Capsules CT")
    mr_caps = registration_mrml.create_capsule_fiducials(scene, caps_ct - shift, "Capsules MRI")
    from SmartBiopsyLib.report.scene_case import module_parameter_node

    fusion_pn = module_parameter_node(scene, "RegistrationFusion")  # Registration Fusion's parameter node
    if fusion_pn is None:
        fusion_pn = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "RegistrationFusion")
        fusion_pn.SetSingletonTag("RegistrationFusion")
        fusion_pn.SetAttribute("ModuleName", "RegistrationFusion")
    fusion_pn.SetNodeReferenceID("ctVolume", ct_node.GetID())
    fusion_pn.SetNodeReferenceID("mriVolume", mri_node.GetID())
    fusion = FusionLogic(scene)
    transform = fusion.register(ct_caps, mr_caps, mri_node)
    tnode = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "QA target")
    tnode.AddControlPoint(*shift.tolist(), "tumour")
    fusion.qa_report(tnode)
    fusion.approve(transform)

    logic = BiopsyLogic(scene)
    dwi = [volumes_mrml.add_volume_node(scene, v, f"DWI b{b:g}") for b, v in case["dwi"].items()]
    maps = logic.compute_maps([(n, -1.0) for n in dwi], water=volumes_mrml.add_volume_node(scene, case["water"], "water"),
                              fat=volumes_mrml.add_volume_node(scene, case["fat"], "fat"),
                              pre=mri_node, post=volumes_mrml.add_volume_node(scene, case["t1_post"], "T1 post"))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Tumour")
    seg.CreateDefaultDisplayNodes()
    lab = volumes_mrml.add_volume_node(scene, case["grid"].with_array(case["mask"].astype(np.uint8)), "tumour", label=True)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(lab)
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg)
    scene.RemoveNode(lab)
    journal = folder / "journal" / "specimens.jsonl"
    journal.parent.mkdir(parents=True, exist_ok=True)  # the user picks a file in an existing folder
    pn = parameter_node(adcMap=maps["adc"], ffMap=maps["ff"], efMap=maps["ef"], tumourSegmentation=seg,
                        tumourSegmentId=seg.GetSegmentation().GetNthSegmentID(0), registrationTransform=transform,
                        journalPath=journal, reportFolder=folder / "report", participantId="P-GUI",
                        operatorName="self-test", potId="P-GUI-POT-A")
    logic.measure_tumour(pn.tumourSegmentation, pn.tumourSegmentId, pn.adcMap)
    result = logic.compute_habitats(pn.adcMap, pn.efMap, pn.ffMap, logic.tumour_mask(seg, pn.tumourSegmentId, pn.adcMap),
                                    transform_node=transform)
    pn.habitatSegmentation, pn.targets = result["nodes"]["segmentation"], result["nodes"]["targets"]

    plan, lines = planner.plan(scene, ct_node, pn.targets, top_n=1, shared_entry=False)
    line_a = next(n for n in lines if n.GetAttribute("TrajectoryPlanner.Region") == "A")
    from SmartBiopsyLib.logic import planned_tip

    entry, _target = planner.line_points(line_a)  # the needle goes to the planned notch tip, beyond the target
    sim = needle_sim.simulate_confirmation_ct(ct, entry, planned_tip(line_a), pn.needleModel, lateral_error_mm=1.0,
                                              seed=1)
    pn.confirmationCT = volumes_mrml.add_volume_node(scene, sim.ct, "Confirmation CT A (simulated)")
    pn.plannedTrajectory = line_a
    logic.detect_needle(pn.confirmationCT, pn.plannedTrajectory, pn.needleModel)
    logic.sample_notch(pn.notchMode, pn.needleModel, pn.notchShiftMm,
                       {"adc": pn.adcMap, "ff": pn.ffMap, "ef": pn.efMap}, pn.registrationTransform)
    from SmartBiopsyLib.logic import region_of_target

    logic.add_specimen(pn.journalPath, pn.potId, region_of_target(line_a), pn.operatorName, pn.participantId)
    log = logic.procedure_log(pn.participantId, pn.operatorName)
    log.set_planning_topogram("2026-01-05T09:00:00Z")
    log.add_scan("confirmation CT A", "2026-01-05T09:20:00Z", 40.0)
    logic.save_procedure_log(pn.journalPath, log)
    return {"pn": pn, "logic": logic, "plan": plan, "transform": transform}


def scenario_logic_report(scene) -> dict:
    """The panel's "Generate report" (the logic API the widget calls) writes the command line's case folder from
    the scene and the session, and the report has every section of the steps done, with figures."""
    import re

    from SmartBiopsyLib.report.case import SECTION_TITLES

    folder = Path(tempfile.mkdtemp(prefix="smartbiopsy-gui-report-"))
    out = gui_case(scene, folder)
    pn, logic = out["pn"], out["logic"]
    path = Path(logic.generate_report(pn.reportFolder, pn))
    html = path.read_text(encoding="utf-8")
    root = Path(pn.reportFolder)
    for rel in ("summary.json", "inputs/ct.nrrd", "registration/fusion.json", "characterisation/habitats.nrrd",
                "characterisation/targets.json", "plan/plan.json", "specimens/specimens.csv", "specimens/procedure.json"):
        assert (root / rel).is_file(), f"{rel} missing from the case folder"
    sections = re.split(r"<section>", html)[1:]
    assert len(sections) == len(SECTION_TITLES), f"{len(sections)} report sections"
    from SmartBiopsyCoreLib.optional import available

    drawn = available("matplotlib")  # without it (Slicer before the install is accepted) figures say why not
    unavailable = {}
    for title, body in zip(SECTION_TITLES, sections):
        if not drawn:
            body = re.sub(r'<p class="na">Figure not drawn: .*?</p>', "", body, flags=re.S)
        unavailable[title] = body.count("not available")
    for title in SECTION_TITLES[1:6]:  # fusion, habitats, trajectories, notch, specimens: all done above
        assert unavailable[title] == 0, f"section '{title}' says 'not available' {unavailable[title]} times"
    figures = html.count("data:image/png;base64,")
    if drawn:
        assert figures >= 5, f"only {figures} figures embedded"
    else:
        assert html.count("Figure not drawn:") >= 5, "the report does not say which figures are missing"
    return {"figures": figures, "not_available": unavailable, "report": str(path)}


SCENARIOS = {
    "maps_and_habitats": scenario_maps_and_habitats,
    "sampling_record": scenario_sampling_record,
    "logic_report": scenario_logic_report,
}

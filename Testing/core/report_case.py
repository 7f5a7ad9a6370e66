"""A small synthetic case output folder, built with the project's real writers, for the report tests.

Layout as the workflow writes it (see SmartBiopsyLib.report.writer). CT from SmartBiopsyCoreLib.phantom.abdomen on a
coarse grid; an MRI world shifted and rotated from the CT world; maps with an ADC/EF gradient across the
tumour so that all three habitats exist. Every JSON comes from the real dataclasses' ``to_dict()``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from RegistrationFusionLib.registration import landmarks, qa
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid, resample
from RegistrationFusionLib.registration.pipeline import FusionResult
from SmartBiopsyLib.characterise import habitats, targets
from SmartBiopsyCoreLib.dataio import imageio
from SmartBiopsyLib.sampling import notch
from SmartBiopsyLib.sampling.needle import NeedleDetection, placement_error
from SmartBiopsyLib.records.procedure_log import ProcedureLog
from SmartBiopsyLib.records.specimen_journal import SpecimenJournal
from TrajectoryPlannerLib.planning import engine
from SmartBiopsyCoreLib.phantom import abdomen as synthetic
from TrajectoryPlannerLib.robot.protocol import RobotTarget, SessionResult

STAGES = ("load", "register", "characterise", "plan", "robot", "sample", "specimens", "report")


def _rot_z(deg):
    a = np.radians(deg)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return m


def build_case(root: Path, pathology: bool = True, synthetic_case: bool = True) -> dict:
    """Write the whole folder under ``root``; returns facts the tests compare with (RAS mm)."""
    root = Path(root)
    ct, labels, tdefs = synthetic.make_abdomen(spacing=(3.0, 3.0, 4.0), fov_mm=(360.0, 300.0, 120.0))
    imageio.save_image(ct, root / "inputs" / "ct.nrrd")
    # MRI world: CT world rotated 4 deg about S and shifted (mri_to_ct maps MRI points to CT points)
    mri_to_ct = _rot_z(4.0)
    mri_to_ct[:3, 3] = [6.0, -4.0, 3.0]
    ct_to_mri = np.linalg.inv(mri_to_ct)
    centre_ct = np.array(synthetic.TUMOUR_CENTRE_RAS)
    centre_mri = (ct_to_mri @ np.r_[centre_ct, 1.0])[:3]
    n = (40, 40, 14)  # i, j, k
    sp = (2.0, 2.0, 5.0)
    origin = centre_mri - 0.5 * np.array(sp) * (np.array(n) - 1)
    grid = make_grid(origin, sp, n[::-1])
    # T2: the CT anatomy seen in the MRI world
    t2 = resample(RasVolume(labels.array.astype(np.float32) * 40.0 + 100.0, labels.ijk_to_ras, "t2"),
                  RasVolume(np.zeros(n[::-1], np.float32), grid), ct_to_mri)
    t2.name = "t2"
    imageio.save_image(t2, root / "inputs" / "mri_t2.nrrd")
    # maps: tumour sphere with an ADC gradient along R and an EF gradient along A
    kk, jj, ii = np.indices(n[::-1])
    ras = RasVolume(np.zeros(n[::-1]), grid).ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1))
    rel = (ras - centre_mri).reshape(n[::-1] + (3,))
    tum = np.linalg.norm(rel, axis=-1) <= synthetic.TUMOUR_RADIUS_MM - 2
    adc = np.where(tum, 1200.0 + 25.0 * rel[..., 0], 2000.0).astype(np.float32)
    ef = np.where(tum, 40.0 + 1.2 * rel[..., 1], 5.0).astype(np.float32)
    ff = np.where(tum, 3.0 + 0.1 * rel[..., 2] ** 2 / 10, 60.0).astype(np.float32)
    maps = {k: RasVolume(v, grid, k, {"units": notch.MAP_UNITS[k]}) for k, v in (("adc", adc), ("ff", ff), ("ef", ef))}
    cdir = root / "characterisation"
    for k, v in maps.items():
        imageio.save_image(v, cdir / f"{k}.nrrd")
    imageio.save_image(RasVolume(tum.astype(np.uint8), grid, "tumour"), cdir / "tumour.nrrd")
    hab = habitats.compute_habitats(maps["adc"], maps["ef"], maps["ff"], tum,
                                    habitats.HabitatConfig(min_region_ml=0.2, island_min_ml=0.05))
    imageio.save_image(hab.labels, cdir / "habitats.nrrd")
    with (cdir / "regions.csv").open("w", newline="") as fh:
        rows = [r.to_dict() for r in hab.regions]
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ts = targets.plan_targets(hab.labels, maps, 1.0)
    targets.write_targets_json(ts, cdir / "targets.json")
    tdoc = json.loads((cdir / "targets.json").read_text())
    for t in tdoc["targets"]:
        t["point_ct_ras"] = (mri_to_ct @ np.r_[t["point_ras"], 1.0])[:3].tolist()
    (cdir / "targets.json").write_text(json.dumps(tdoc))
    (cdir / "characterisation.json").write_text(json.dumps({"habitats": hab.to_dict(),
                                                             "targets": [t.to_dict() for t in ts]}, default=float))
    # fusion: six skin capsules, MRI copies with 0.3 mm localisation noise
    rng = np.random.default_rng(3)
    caps_ct = np.array([[-140, 30, -30], [-120, 70, 20], [-60, 105, -10], [0, 110, 30], [-150, -20, 10],
                        [-90, 90, 40]], float)
    caps_mr = (caps_ct @ ct_to_mri[:3, :3].T + ct_to_mri[:3, 3]) + rng.normal(0, 0.3, caps_ct.shape)
    corr, reg = landmarks.register_capsules(caps_ct, caps_mr)
    tgt_ct = {t["name"]: t["point_ct_ras"] for t in tdoc["targets"]}
    rep = qa.build_report(reg, tgt_ct, correspondence=corr)
    fusion = FusionResult(reg.matrix, corr, reg, None, rep)
    rdir = root / "registration"
    rdir.mkdir(parents=True, exist_ok=True)
    (rdir / "fusion.json").write_text(json.dumps(fusion.to_dict()))
    rep.write_json(rdir / "qa.json")
    imageio.save_image(resample(t2, ct, reg.matrix), rdir / "t2_on_ct.nrrd")
    # plan
    plan = engine.plan(ct, [{"name": t["name"], "region": t["region"], "point_ras": t["point_ct_ras"]}
                            for t in tdoc["targets"]],
                       labelmaps=[(labels, synthetic.RISK_LABELS)],
                       settings=engine.PlanSettings(entry_spacing_mm=9.0, top_n=2, threads=1))
    pdir = root / "plan"
    pdir.mkdir(parents=True, exist_ok=True)
    pdoc = plan.to_dict()
    (pdir / "plan.json").write_text(json.dumps(pdoc))
    chosen = sorted((t for t in pdoc["trajectories"] if t["rank"] == 1), key=lambda t: t["target"])
    # robot
    session = SessionResult([RobotTarget(t["target"], t["region"], t["entry_ras"], t["target_ras"], state="reached",
                                         target_id=f"TGT_{i}", transmissions=1, echo_error_mm=0.01,
                                         echo_error_deg=0.02, robot_status="OK", reached_error_mm=0.4)
                             for i, t in enumerate(chosen)], completed=True, log_path="robot/session.jsonl")
    (root / "robot").mkdir(parents=True, exist_ok=True)
    (root / "robot" / "session.json").write_text(json.dumps(session.to_dict()))
    # robot calibration: the frame fitted in a simulated calibration CT, written by the real writers
    from SmartBiopsyCoreLib.fiducial_frames.model import load_model
    from SmartBiopsyCoreLib.phantom.robot_frame import calibration_ct
    from TrajectoryPlannerLib.calibration.calibration_file import write_calibration
    from TrajectoryPlannerLib.calibration.frame_fit import calibrate_from_ct
    from TrajectoryPlannerLib.calibration.picture import write_calibration_picture

    frame = load_model("spheres-6")
    cal_ct, _ = calibration_ct(3, frame, pixel_mm=1.5, slice_mm=2.0)
    cal = calibrate_from_ct(cal_ct, frame, {t["target"]: t["target_ras"] for t in chosen})
    write_calibration(cal, root / "robot" / "calibration")
    write_calibration_picture(cal_ct, cal, root / "robot" / "calibration" / "calibration.png")
    # sampling: needle 1 mm lateral of the plan, tip-distal notch sampled on the maps' own grid
    sdir = root / "sampling"
    all_values = {}
    (root / "specimens").mkdir(parents=True, exist_ok=True)
    journal = SpecimenJournal(root / "specimens" / "journal.jsonl")
    log = ProcedureLog(participant_id="P001", planning_topogram_utc="2024-05-01T09:00:00Z", operator="Dr Test")
    log.add_scan("planning", "2024-05-01T09:02:00Z", 310.0)
    for i, t in enumerate(chosen):
        e, g = np.asarray(t["entry_ras"]), np.asarray(t["target_ras"])
        d = (g - e) / np.linalg.norm(g - e)
        lat = np.cross(d, [0, 0, 1.0])
        lat /= np.linalg.norm(lat)
        tip = g + 1.0 * lat
        pe = placement_error(e, g, tip, d)
        det = NeedleDetection(t["target"], tip, d, e + 5 * d, float(np.linalg.norm(tip - e)) - 5, e, g,
                              pe.tip_error_mm, pe.lateral_error_mm, pe.depth_error_mm, pe.angle_deg,
                              pe.lateral_vector_ras, 0.3, 2800.0, 40.0, 1500.0, 15.0, 120)
        roi = notch.notch_roi(tip, d, notch.TIP_DISTAL, target_name=t["target"])
        vals = notch.sample_maps(roi, maps, reg.matrix)
        tdir = sdir / t["target"].replace(" ", "_")
        tdir.mkdir(parents=True, exist_ok=True)
        (tdir / "needle.json").write_text(json.dumps({"detection": det.to_dict()}))
        (tdir / "notch.json").write_text(json.dumps({"roi": roi.to_dict(), "values": vals.to_dict()}))
        all_values[t["target"]] = vals.to_dict()
        mv = {k: {"mean": s.mean, "median": s.median, "min": s.min, "sd": s.sd, "n_voxels": s.voxels_touched,
                  "volume_mm3": s.volume_mm3} for k, s in vals.maps.items()}
        journal.append_specimen({"pot_id": f"POT-{t['region']}", "region": t["region"], "target_name": t["target"],
                                 "needle_tip_ras": tip.tolist(), "needle_direction_ras": d.tolist(),
                                 "notch_roi": roi.to_dict(), "values": mv, "operator": "Dr Test",
                                 "time_utc": f"2024-05-01T09:{20 + 8 * i:02d}:00Z", "participant_id": "P001"})
        log.add_scan(f"confirmation {t['region']}", f"2024-05-01T09:{19 + 8 * i:02d}:00Z", 45.0)
        log.add_manipulation(t["region"], 1)
    (sdir / "notch_values.json").write_text(json.dumps(all_values))
    journal.export_csv(root / "specimens" / "specimens.csv")
    journal.close()
    (root / "specimens" / "procedure.json").write_text(json.dumps(log.to_dict()))
    if pathology:
        with (root / "specimens" / "pathology.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["pot_id", "ki67_percent", "fnclcc_grade"])
            for k, t in enumerate(chosen):
                w.writerow([f"POT-{t['region']}", 10.0 + 15.0 * k, 2])
    summary = {"case": {"name": "report-test", "source": "phantom seed 0", "synthetic": synthetic_case},
               "stages": [{"name": s, "status": "done", "seconds": 0.5 + i, "message": ""}
                          for i, s in enumerate(STAGES)],
               "peak_memory_mb": 321.0}
    if synthetic_case:  # the phantom truth check the workflow records for a synthetic case
        summary["truth_check"] = {"simulated": True,
                                  "lines": ["registration error vs truth at tumour points: mean 0.40 mm"]}
    (root / "summary.json").write_text(json.dumps(summary))
    return {"mri_to_ct": reg.matrix, "targets": tdoc["targets"], "trajectories": chosen, "maps": maps}


def set_stage(root: Path, name: str, status: str, message: str):
    """Mark stage ``name`` (and every later stage as skipped) in summary.json, as a stopped run writes it."""
    p = Path(root) / "summary.json"
    s = json.loads(p.read_text())
    hit = False
    for st in s["stages"]:
        if st["name"] == name:
            st["status"], st["message"], hit = status, message, True
        elif hit:
            st["status"], st["message"] = "skipped", ""
    p.write_text(json.dumps(s))

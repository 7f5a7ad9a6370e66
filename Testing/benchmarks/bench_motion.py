"""Patient motion between planning and confirmation CT: needle tip and notch values with and without correction.

Phantom seed 0, one needle (1.0 mm lateral, 0.5 mm depth placement error), confirmation CTs after a 5 mm rigid
shift and after the same shift plus a breathing displacement of the tumour (0, 2, 5) mm. Prints, per case and
correction, the tip error against the truth (mm) and the notch-mean deviation of ADC and EF from the truth
maps sampled in the true notch (%), plus the time of the motion check.

    python Testing/benchmarks/bench_motion.py
"""
from __future__ import annotations

import time

import numpy as np


def main() -> None:
    from RegistrationFusionLib.capsules.detection import detect_capsules
    from SmartBiopsyCoreLib.phantom.confirmation import PatientMotion, confirmation_ct
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom
    from SmartBiopsyLib.sampling.motion import check_patient_motion, to_planning_frame
    from SmartBiopsyLib.sampling.needle import detect_needle, resolve_needle_geometry
    from SmartBiopsyLib.sampling.notch import notch_roi, notch_roi_from_detection, sample_maps

    needle = "15G/16G-16cm"
    case = generate_phantom(0)
    centre = case.anatomy.tumour_centre
    target = centre + np.array([5.0, 0.0, 0.0])
    entry = target + np.array([60.0, 60.0, 0.0])
    caps = detect_capsules(case.ct, "ct")
    truth_maps = {"adc": case.truth.adc, "ef": case.truth.ef}
    od = resolve_needle_geometry(needle)["outer_diameter_mm"]
    print(f"{'case':<22} {'correction':<28} {'tip err mm':>10} {'ADC %':>7} {'EF %':>7} {'check s':>8}")
    for label, extra in (("5 mm shift", {}), ("5 mm shift + breathing", {"breathing_mm": (0.0, 2.0, 5.0)})):
        conf = confirmation_ct(case, entry, target, outer_diameter_mm=od, lateral_error_mm=1.0, depth_error_mm=0.5,
                               motion=PatientMotion(shift_mm=(3.0, -3.0, 2.65), centre_ras=centre, **extra), seed=1)
        want = sample_maps(notch_roi(conf.truth.tip_planning_ras, conf.truth.axis_planning, needle=needle),
                           truth_maps, mri_to_ct=case.truth.mri_to_ct)
        for name, kw in (("none", {"correct": False}), ("capsules", {}), ("capsules + local", {"planning_ct": case.ct})):
            t0 = time.perf_counter()
            mo = check_patient_motion(caps, conf.ct, target_ras=target, **kw)
            secs = time.perf_counter() - t0
            ct = to_planning_frame(conf.ct, mo, case.ct, [entry, target]) if mo.corrected else conf.ct
            det = detect_needle(ct, entry, target, needle=needle)
            got = sample_maps(notch_roi_from_detection(det, needle=needle), truth_maps, mri_to_ct=case.truth.mri_to_ct)
            dev = {k: 100 * (got.maps[k].mean / want.maps[k].mean - 1) for k in truth_maps}
            err = np.linalg.norm(det.tip_ras - conf.truth.tip_planning_ras)
            print(f"{label:<22} {name + (' (' + mo.method + ')' if mo.corrected else ''):<28} {err:10.2f} "
                  f"{dev['adc']:7.2f} {dev['ef']:7.2f} {secs:8.1f}")


if __name__ == "__main__":
    main()

"""Fusion error benchmark: is the predicted 95th-percentile error honest, and which local refinement is best?

On deformed and rigid phantom seeds that no test uses (deformed 100-109, rigid 100-102 by default) it runs
the capsule landmark registration, then each local refinement engine in a box around the tumour, and
prints two tables measured in the same run:

1. engines side by side: wall time and true TRE at the tumour points (mean / max, mm) per seed kind, with
   the landmark result as the baseline row;
2. the error model with the default engine: per target (habitat targets A/B/C at the deepest point of the
   true habitat regions), the true error, the predicted 95th percentile, the registration allowance
   (depth - needle error - half notch) and the QA verdict; then coverage on deformed seeds, the ratio
   predicted / true on rigid seeds, and whether QA ever passed a target whose true error exceeds its
   allowance.

Generated phantoms (about 12 s each) and their capsule detections are cached under
``$SMARTBIOPSY_BENCH_CACHE`` (default /tmp/smartbiopsy_bench_phantoms), so a second run takes a few minutes.

    .venv/bin/python Testing/benchmarks/bench_fusion_error.py [--deformed 100 101] [--rigid 100] [--engines ...]
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for _m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner"):
    if str(ROOT / _m) not in sys.path:
        sys.path.insert(0, str(ROOT / _m))

CACHE = Path(os.environ.get("SMARTBIOPSY_BENCH_CACHE", "/tmp/smartbiopsy_bench_phantoms"))


def load_case(seed: int, deformation: bool) -> dict:
    """CT, T2, tumour mask, true habitats, capsule detections and the truth of one phantom (cached on disk)."""
    from SmartBiopsyCoreLib.phantom.sarcoma import displacement_from_params

    path = CACHE / f"seed{seed}_{'deformed' if deformation else 'rigid'}.pkl"
    if path.exists():
        with open(path, "rb") as fh:
            d = pickle.load(fh)
    else:
        from RegistrationFusionLib.capsules.detection import detect_capsules
        from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

        case = generate_phantom(seed, deformation=deformation, cache=False)
        t = case.truth
        d = {"seed": seed, "deformation": deformation, "ct": case.ct, "t2": case.mri["t2"],
             "tumour": t.tumour_mask_mri, "habitats": t.mri_habitats, "mri_to_ct": np.array(t.mri_to_ct),
             "displacement": None if t.displacement is None else dict(t.displacement.params),
             "capsules_ct": detect_capsules(case.ct, "ct"), "capsules_mri": detect_capsules(case.mri["t2"], "mr")}
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".tmp"), "wb") as fh:
            pickle.dump(d, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(path.with_suffix(".tmp"), path)
    disp = None if d["displacement"] is None else displacement_from_params(d["displacement"])
    m = d["mri_to_ct"]

    def true_map(x):
        p = np.asarray(x, float).reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]
        return p + disp(p) if disp is not None else p

    d["true_map"] = true_map
    return d

"""Writing a robot calibration: ``calibration.json`` (schema ``smartbiopsy.robot_calibration/1``, through the
robot bridge's own validating writer), the ITK file and the QA JSON.

``calibration.json`` is written only when the QA passed, so a failed calibration can never be handed to the
robot by mistake; ``calibration_qa.json`` is always written and says why. ``robot_to_ct.tfm``: the same
transform in ITK's convention (LPS, maps CT points to robot points), as Slicer writes a linear transform node
placed on robot-frame data.
"""
from __future__ import annotations

import json
from pathlib import Path

from SmartBiopsyCoreLib.dataio.transforms import write_itk_transform
from TrajectoryPlannerLib.calibration.frame_fit import CalibrationResult
from TrajectoryPlannerLib.robot.calibration_io import write_robot_calibration


def write_calibration(result: CalibrationResult, out_dir) -> dict:
    """Write calibration_qa.json and, when the QA passed, calibration.json and robot_to_ct.tfm; returns paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = result.to_dict()
    paths = {"qa": out / "calibration_qa.json"}
    paths["qa"].write_text(json.dumps({**doc["qa"], "model": result.model.to_dict()}, indent=1, allow_nan=False),
                           encoding="utf-8")
    for stale in ("calibration.json", "robot_to_ct.tfm"):
        (out / stale).unlink(missing_ok=True)  # never leave an earlier calibration beside a failed one
    if result.passed:
        paths["calibration"] = Path(write_robot_calibration(out / "calibration.json", doc["matrix_robot_to_ct_ras"],
                                                            doc["qa"], doc["source"]))
        paths["itk"] = out / "robot_to_ct.tfm"
        write_itk_transform(result.matrix_robot_to_ct_ras, str(paths["itk"]))
    return {k: str(v) for k, v in paths.items()}

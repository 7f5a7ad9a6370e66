"""Writing a robot calibration: ``calibration.json`` (schema ``smartbiopsy.robot_calibration/1``), the ITK file
and the QA JSON. The robot bridge reads the JSON back and refuses targeting unless its QA passed.

``calibration.json`` keys: schema, from_frame "ROBOT", to_frame "CT", space "RAS", units "mm",
matrix_robot_to_ct_ras (4x4, maps robot-frame points to CT RAS points), qa (passed: JSON true/false, checks,
residuals, predicted errors), source. ``robot_to_ct.tfm``: the same transform in ITK's convention (LPS,
maps CT points to robot points), as Slicer writes a linear transform node placed on robot-frame data.
"""
from __future__ import annotations

import json
from pathlib import Path

from SmartBiopsyCoreLib.dataio.transforms import write_itk_transform
from TrajectoryPlannerLib.calibration.frame_fit import CalibrationResult


def write_calibration(result: CalibrationResult, out_dir) -> dict:
    """Write calibration.json, robot_to_ct.tfm and calibration_qa.json into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = result.to_dict()
    paths = {"calibration": out / "calibration.json", "itk": out / "robot_to_ct.tfm", "qa": out / "calibration_qa.json"}
    paths["calibration"].write_text(json.dumps(doc, indent=1, allow_nan=False), encoding="utf-8")
    write_itk_transform(result.matrix_robot_to_ct_ras, str(paths["itk"]))
    paths["qa"].write_text(json.dumps({**doc["qa"], "model": result.model.to_dict()}, indent=1, allow_nan=False),
                           encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}

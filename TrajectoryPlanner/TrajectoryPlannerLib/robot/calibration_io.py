"""Robot calibration on disk and the geometry checks every pose sent to or received from the robot passes.

JSON schema ``smartbiopsy.robot_calibration/1`` (every key required; unknown keys are refused)::

    {
      "schema": "smartbiopsy.robot_calibration/1",
      "from_frame": "ROBOT",          # the robot base frame ...
      "to_frame": "CT",               # ... mapped into the planning CT
      "space": "RAS",                 # Slicer world coordinates (never LPS)
      "units": "mm",
      "matrix_robot_to_ct_ras": [[...4x4...]],   # p_ct = M @ p_robot, rigid (rotation + translation)
      "qa": {"passed": true, ...},    # JSON true only; any other value refuses the file
      "source": "fiducial frame registration"   # free text: who computed it
    }

The calibration is computed by the project (fiducial frame in the CT); this module only reads and checks
it. There is no default: without a calibration file a robot session refuses targeting unless the
operator states explicitly that the robot works in CT coordinates (``--robot-frame ct``).

:func:`rigid_problem` is the one rigidity check (rotation orthonormal within 1e-3, determinant +1, finite,
last row 0 0 0 1) used by the sender for what it sends and receives and by the simulator for what it
accepts.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from TrajectoryPlannerLib.errors import RobotBridgeError
from SmartBiopsyCoreLib.dataio import jsonio

SCHEMA = "smartbiopsy.robot_calibration/1"
MATRIX_KEY = "matrix_robot_to_ct_ras"
_KEYS = {"schema", "from_frame", "to_frame", "space", "units", MATRIX_KEY, "qa", "source"}
_FIXED = {"schema": SCHEMA, "from_frame": "ROBOT", "to_frame": "CT", "space": "RAS", "units": "mm"}
#: Largest deviation of R^T R from the identity (and of det R from 1) accepted as a rotation.
ROTATION_TOLERANCE = 1e-3
#: Translations beyond this (mm) cannot be a patient or robot coordinate.
MAX_TRANSLATION_MM = 5000.0


def rigid_problem(matrix, tol: float = ROTATION_TOLERANCE) -> str | None:
    """None when ``matrix`` is a finite rigid 4x4 transform (mm); otherwise what is wrong, as a phrase."""
    try:
        m = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError):
        return "is not a matrix of numbers"
    if m.shape != (4, 4):
        return f"is not 4x4 (shape {m.shape})"
    if not np.all(np.isfinite(m)):
        return "contains NaN or infinite values"
    if np.max(np.abs(m[3] - (0.0, 0.0, 0.0, 1.0))) > 1e-6:
        return "is not affine (last row must be 0 0 0 1)"
    r = m[:3, :3]
    ortho = float(np.max(np.abs(r.T @ r - np.eye(3))))
    if not ortho <= tol:
        return f"has a rotation that is not orthonormal (deviation {ortho:.3g}, scaled or sheared)"
    det = float(np.linalg.det(r))
    if not det > 0:  # orthonormal within tol already bounds |det| to 1 +- 3 tol: only the sign is left
        return f"has a rotation with determinant {det:.3g} instead of +1 (mirrored)"
    if float(np.max(np.abs(m[:3, 3]))) > MAX_TRANSLATION_MM:
        return f"has a translation beyond {MAX_TRANSLATION_MM:g} mm"
    return None


def require_rigid(matrix, what: str) -> np.ndarray:
    """The matrix as a float 4x4 array; RobotBridgeError naming ``what`` when it is not rigid."""
    problem = rigid_problem(matrix)
    if problem:
        raise RobotBridgeError(f"The {what} {problem}; it is not sent or used.")
    return np.asarray(matrix, dtype=float)


@dataclass
class RobotCalibration:
    """Robot base -> CT RAS (mm), rigid, with the QA that accepted it."""

    matrix_robot_to_ct_ras: np.ndarray
    qa: dict
    source: str
    path: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**_FIXED, MATRIX_KEY: np.asarray(self.matrix_robot_to_ct_ras, float).tolist(), "qa": dict(self.qa),
                "source": self.source}


def calibration_from_dict(data, where: str = "the robot calibration") -> RobotCalibration:
    """Validate a parsed calibration document; RobotBridgeError with one sentence when anything is off."""
    if not isinstance(data, dict):
        raise RobotBridgeError(f"{where} is not a JSON object in the {SCHEMA} schema; compute the calibration again.")
    jsonio.require_exact_keys(data, _KEYS, where, f"; only the {SCHEMA} keys are accepted.",
                              "; compute the calibration again.", error=RobotBridgeError)
    for key, value in _FIXED.items():
        if data[key] != value:
            raise RobotBridgeError(f"{where} has {key} {data[key]!r} instead of {value!r}; a calibration in another "
                                   "frame, direction or unit would move every target.")
    raw = data[MATRIX_KEY]
    if (not isinstance(raw, list) or len(raw) != 4
            or not all(isinstance(row, list) and len(row) == 4 for row in raw)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for row in raw for v in row)):
        raise RobotBridgeError(f"{where}: {MATRIX_KEY} must be a 4x4 list of numbers; compute the calibration again.")
    if not all(math.isfinite(v) for row in raw for v in row):
        raise RobotBridgeError(f"{where}: {MATRIX_KEY} contains NaN or infinite values; compute the calibration again.")
    problem = rigid_problem(raw)
    if problem:
        raise RobotBridgeError(f"{where}: {MATRIX_KEY} {problem}; a robot calibration must be rigid, recompute it.")
    qa = data["qa"]
    if not isinstance(qa, dict) or qa.get("passed") is not True:
        got = qa.get("passed") if isinstance(qa, dict) else qa
        raise RobotBridgeError(f"{where}: its QA did not pass (qa.passed is {jsonio.dumps(got)}, not true); redo the "
                               "robot calibration before targeting.")
    source = data["source"]
    if not isinstance(source, str) or not source.strip():
        raise RobotBridgeError(f"{where}: 'source' must say who computed the calibration.")
    return RobotCalibration(np.asarray(raw, float), dict(qa), source)


def load_robot_calibration(path) -> RobotCalibration:
    """Read and validate a ``smartbiopsy.robot_calibration/1`` file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise RobotBridgeError(f"Robot calibration file {p} does not exist; check the path.") from None
    except OSError as exc:
        raise RobotBridgeError(f"Robot calibration file {p} cannot be read ({exc}).") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise RobotBridgeError(f"Robot calibration file {p.name} is not valid JSON ({exc}); compute it "
                               "again.") from None
    cal = calibration_from_dict(data, f"Robot calibration file {p.name}")
    cal.path = str(p)
    return cal


def write_robot_calibration(path, matrix_robot_to_ct_ras, qa: dict, source: str) -> str:
    """Write a calibration file (validated first, so a bad one is never written)."""
    doc = {**_FIXED, MATRIX_KEY: np.asarray(matrix_robot_to_ct_ras, float).tolist(), "qa": qa, "source": source}
    calibration_from_dict(doc, "The robot calibration to write")
    Path(path).write_text(jsonio.dumps(doc, indent=1))
    return str(path)


def _refuse_constant(name):
    raise ValueError(f"{name} is not a number")

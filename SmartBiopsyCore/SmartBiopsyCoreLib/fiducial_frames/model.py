"""The fiducial-frame model: schema ``smartbiopsy.fiducial_frame/1``, validation and the built-in models.

A model file is JSON with exactly these keys (unknown keys are refused)::

    {
      "schema": "smartbiopsy.fiducial_frame/1",
      "name": "zframe-7tube",
      "description": "...",
      "frame": "ROBOT",                     # coordinates are in the robot's base frame
      "units": "mm",
      "manufacturing_tolerance_mm": 0.1,    # added to the predicted calibration error
      "ct_intensity_hu": {"min": 450, "max": 1400, "nominal": 800},   # the fiducials' CT number
      "tubes":   [{"name": "E1", "start": [x, y, z], "end": [x, y, z], "radius_mm": 2.0}, ...],
      "spheres": [{"name": "S1", "centre": [x, y, z], "radius_mm": 3.0}, ...]
    }

A model has tubes or spheres (not both). Tubes: at least two non-parallel ones (else the pose along them is
undetermined). Spheres: at least four, not all in one line. Built-in models: :func:`builtin_models`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.dataio.jsonio import require_exact_keys

SCHEMA = "smartbiopsy.fiducial_frame/1"
_KEYS = {"schema", "name", "description", "frame", "units", "manufacturing_tolerance_mm", "ct_intensity_hu",
         "tubes", "spheres"}
_HERE = Path(__file__).resolve().parent  # the built-in model files sit beside this module
BUILTIN = {"zframe-7tube": _HERE / "zframe-7tube.json", "spheres-6": _HERE / "spheres-6.json"}
DEFAULT_MODEL = "zframe-7tube"


@dataclass(frozen=True)
class Tube:
    name: str
    start: np.ndarray
    end: np.ndarray
    radius_mm: float

    @property
    def direction(self) -> np.ndarray:
        d = self.end - self.start
        return d / np.linalg.norm(d)

    @property
    def length_mm(self) -> float:
        return float(np.linalg.norm(self.end - self.start))


@dataclass(frozen=True)
class Sphere:
    name: str
    centre: np.ndarray
    radius_mm: float


@dataclass(frozen=True)
class FrameModel:
    """A robot's fiducial frame in the robot frame (mm)."""

    name: str
    description: str
    tubes: tuple = ()
    spheres: tuple = ()
    hu_min: float = 450.0
    hu_max: float = 1400.0
    hu_nominal: float = 800.0
    tolerance_mm: float = 0.1
    source: str = field(default="", compare=False)

    @property
    def kind(self) -> str:
        return "tubes" if self.tubes else "spheres"

    @property
    def centre(self) -> np.ndarray:
        pts = ([t.start for t in self.tubes] + [t.end for t in self.tubes]) if self.tubes else \
            [s.centre for s in self.spheres]
        return np.mean(pts, axis=0)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "name": self.name, "description": self.description, "frame": "ROBOT", "units": "mm",
            "manufacturing_tolerance_mm": self.tolerance_mm,
            "ct_intensity_hu": {"min": self.hu_min, "max": self.hu_max, "nominal": self.hu_nominal},
            "tubes": [{"name": t.name, "start": t.start.tolist(), "end": t.end.tolist(), "radius_mm": t.radius_mm}
                      for t in self.tubes],
            "spheres": [{"name": s.name, "centre": s.centre.tolist(), "radius_mm": s.radius_mm} for s in self.spheres],
        }


def _vec3(v, what: str) -> np.ndarray:
    try:
        a = np.asarray(v, float)
    except (TypeError, ValueError):
        raise InputDataError(f"{what} is not a list of three numbers") from None
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise InputDataError(f"{what} must be three finite numbers in mm")
    return a


def _positive(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
        raise InputDataError(f"{what} must be a positive number of mm")
    return float(v)


def parse_model(data, where: str = "the frame model") -> FrameModel:
    """Validate a parsed ``smartbiopsy.fiducial_frame/1`` document; refuse anything else with a sentence."""
    if not isinstance(data, dict):
        raise InputDataError(f"{where} is not a {SCHEMA} JSON object")
    if data.get("schema") != SCHEMA:
        raise InputDataError(f"{where} has schema {data.get('schema')!r}, not {SCHEMA!r}")
    require_exact_keys(data, _KEYS, where, f"; see the {SCHEMA} schema", f"; see the {SCHEMA} schema")
    if data["frame"] != "ROBOT" or data["units"] != "mm":
        raise InputDataError(f"{where} must give the fiducials in the ROBOT frame in mm "
                             f"(got {data['frame']!r}, {data['units']!r})")
    hu = data["ct_intensity_hu"]
    if not isinstance(hu, dict) or set(hu) != {"min", "max", "nominal"} or \
            not all(isinstance(hu[k], (int, float)) and not isinstance(hu[k], bool) for k in hu) or \
            not hu["min"] < hu["nominal"] < hu["max"]:
        raise InputDataError(f"{where}: ct_intensity_hu must be {{min, nominal, max}} numbers with min < nominal < max")
    tubes, spheres = data["tubes"], data["spheres"]
    if not isinstance(tubes, list) or not isinstance(spheres, list):
        raise InputDataError(f"{where}: tubes and spheres must be lists")
    if bool(tubes) == bool(spheres):
        raise InputDataError(f"{where} must define either tubes or spheres (one kind of fiducial)")
    names = set()
    out_t, out_s = [], []
    for i, t in enumerate(tubes):
        if not isinstance(t, dict) or set(t) != {"name", "start", "end", "radius_mm"}:
            raise InputDataError(f"{where}: tube {i + 1} needs exactly name, start, end, radius_mm")
        a, b = _vec3(t["start"], f"tube {t['name']} start"), _vec3(t["end"], f"tube {t['name']} end")
        if np.linalg.norm(b - a) < 10.0:
            raise InputDataError(f"{where}: tube {t['name']} is shorter than 10 mm; a tube must be elongated")
        out_t.append(Tube(str(t["name"]), a, b, _positive(t["radius_mm"], f"tube {t['name']} radius_mm")))
        names.add(str(t["name"]))
    for i, s in enumerate(spheres):
        if not isinstance(s, dict) or set(s) != {"name", "centre", "radius_mm"}:
            raise InputDataError(f"{where}: sphere {i + 1} needs exactly name, centre, radius_mm")
        out_s.append(Sphere(str(s["name"]), _vec3(s["centre"], f"sphere {s['name']} centre"),
                            _positive(s["radius_mm"], f"sphere {s['name']} radius_mm")))
        names.add(str(s["name"]))
    if len(names) != len(out_t) + len(out_s):
        raise InputDataError(f"{where}: fiducial names must be unique")
    if out_t:
        dirs = np.array([t.direction for t in out_t])
        if np.all(np.abs(dirs @ dirs[0]) > np.cos(np.radians(5.0))):
            raise InputDataError(f"{where}: all tubes are parallel; the frame's pose along them cannot be determined")
    else:
        if len(out_s) < 4:
            raise InputDataError(f"{where}: a sphere frame needs at least four spheres")
        c = np.array([s.centre for s in out_s])
        sv = np.linalg.svd(c - c.mean(0), compute_uv=False)
        if sv[1] < 1e-3 * sv[0]:
            raise InputDataError(f"{where}: the spheres lie on one line; the pose is undetermined")
    return FrameModel(name=str(data["name"]), description=str(data["description"]), tubes=tuple(out_t),
                      spheres=tuple(out_s), hu_min=float(hu["min"]), hu_max=float(hu["max"]),
                      hu_nominal=float(hu["nominal"]),
                      tolerance_mm=float(data["manufacturing_tolerance_mm"]), source=where)


def load_model(name_or_path) -> FrameModel:
    """A built-in model by name (:data:`BUILTIN`) or a model JSON file."""
    key = str(name_or_path)
    path = BUILTIN.get(key, Path(key))
    if not path.is_file():
        raise InputDataError(f"no frame model {key!r}: give a model JSON file or one of {', '.join(sorted(BUILTIN))}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputDataError(f"the frame model {path.name} is not valid JSON ({type(exc).__name__})") from None
    return parse_model(data, f"the frame model {path.name}")


def builtin_models() -> list[str]:
    return sorted(BUILTIN)

"""The one JSON writer of SmartBiopsy: every JSON file (and JSON line) the project writes is strictly valid.

JSON has no NaN or Infinity. Python's ``json`` writes them anyway (``NaN``), which strict parsers (browsers,
FHIR servers, ``jq``) refuse. Here every non-finite float becomes ``null``; a written document that is a
JSON object then also carries ``"null_reasons": {"<json path>": "not a finite number (nan)"}`` so a reader
knows why the value is missing (a missing measurement, not a zero). numpy scalars and arrays, ``Path`` and
result objects with ``to_dict()`` are converted; the text is produced with ``allow_nan=False``, so a
non-finite value that slipped through raises instead of being written.

    write_json(path, data)         atomic write (temporary file + rename), returns the path
    dumps(data, **json_kwargs)     the text (for stdout summaries, JSON lines, node attributes)
    to_jsonable(data, reasons)     the converted tree; non-finite floats -> None, reasons[path] = why
    require_exact_keys(...)        readers: a document with an unknown or a missing key is refused (fail closed)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

#: key added to a written JSON object that had non-finite values: {json path: reason}
NULL_REASONS_KEY = "null_reasons"


def to_jsonable(obj, reasons: dict | None = None, path: str = "$"):
    """``obj`` as plain JSON types. Non-finite floats become None and ``reasons[path]`` says why."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        if reasons is not None:
            reasons[path] = f"not a finite number ({obj!r}); no value"
        return None
    if isinstance(obj, dict):
        return {_key(k): to_jsonable(v, reasons, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, reasons, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    try:  # numpy without importing it here
        import numpy as np

        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist(), reasons, path)
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.generic):
            return to_jsonable(obj.item(), reasons, path)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict(), reasons, path)
    return str(obj)


def _key(k) -> str:
    """A dict key as ``json`` writes it (True -> "true", 1.5 -> "1.5")."""
    if isinstance(k, str):
        return k
    if isinstance(k, (bool, int, float)) or k is None:
        return json.dumps(k)
    return str(k)


def dumps(obj, *, with_reasons: bool = False, **kwargs) -> str:
    """Strict JSON text of ``obj`` (``allow_nan=False``). ``with_reasons``: a dict gets ``null_reasons``."""
    reasons: dict = {}
    clean = to_jsonable(obj, reasons)
    if with_reasons and reasons and isinstance(clean, dict):
        clean[NULL_REASONS_KEY] = {**(clean.get(NULL_REASONS_KEY) or {}), **reasons}
    return json.dumps(clean, allow_nan=False, **kwargs)


def write_json(path, data, *, indent: int | None = 1, **kwargs) -> Path:
    """Write ``data`` as strict JSON to ``path`` atomically (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(data, with_reasons=True, indent=indent, **kwargs)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def loads_strict(text: str):
    """Parse JSON and refuse NaN/Infinity (what a strict parser does); for tests and input checks."""
    def _refuse(name):
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=_refuse)


def require_exact_keys(data: dict, keys, where: str, unknown_hint: str, missing_hint: str, error=None) -> None:
    """Refuse a parsed JSON object whose keys are not exactly ``keys``: unknown keys first, then missing ones,
    each as one sentence ``"<where> has unknown keys a, b<unknown_hint>"`` / ``"<where> lacks a<missing_hint>"``
    raised as ``error`` (default :class:`~SmartBiopsyCoreLib.errors.InputDataError`)."""
    if error is None:
        from SmartBiopsyCoreLib.errors import InputDataError as error
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise error(f"{where} has unknown keys {', '.join(unknown)}{unknown_hint}")
    missing = sorted(set(keys) - set(data))
    if missing:
        raise error(f"{where} lacks {', '.join(missing)}{missing_hint}")

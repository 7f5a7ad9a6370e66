"""What a result was made from: SmartBiopsy's version and the SHA-256 checksum of every input file.

:func:`run_provenance` returns ``{"version", "inputs": [{"path", "sha256", "bytes"}]}`` for summary.json and
the report. A DICOM folder is one entry: its ``sha256`` is the checksum of the sorted list of
``<relative path> <file sha256>`` lines of every file in it, ``bytes`` their total and ``files`` their count,
so that the same series copied elsewhere gives the same checksum.
"""
from __future__ import annotations

import hashlib
import logging
import os

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def file_sha256(path) -> tuple[str, int]:
    """(hex SHA-256, size in bytes) of one file."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def checksum_entry(path) -> dict | None:
    """``{"path", "sha256", "bytes"}`` (plus ``"files"`` for a folder) of an input; None when it is not on disk."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        digest, size = file_sha256(path)
        return {"path": path, "sha256": digest, "bytes": size}
    if os.path.isdir(path):
        lines, total = [], 0
        for base, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(base, name)
                digest, size = file_sha256(full)
                lines.append(f"{os.path.relpath(full, path).replace(os.sep, '/')} {digest}\n")
                total += size
        h = hashlib.sha256("".join(sorted(lines)).encode("utf-8"))
        return {"path": path, "sha256": h.hexdigest(), "bytes": total, "files": len(lines)}
    return None


def run_provenance(paths) -> dict:
    """``{"version": SmartBiopsy version, "inputs": [checksum entries]}`` for the distinct existing ``paths``
    (in the given order; paths that are not on disk are left out)."""
    from SmartBiopsyCoreLib import __version__

    seen, inputs = set(), []
    for p in paths:
        if not p:
            continue
        key = os.path.abspath(os.fspath(p))
        if key in seen:
            continue
        seen.add(key)
        try:
            entry = checksum_entry(key)
        except OSError as exc:  # unreadable input: say so instead of a checksum
            logger.warning("no checksum for %s (%s)", key, exc.__class__.__name__)
            entry = {"path": key, "sha256": None, "bytes": None, "reason": f"not readable ({exc.__class__.__name__})"}
        if entry is not None:
            inputs.append(entry)
    return {"version": __version__, "inputs": inputs}

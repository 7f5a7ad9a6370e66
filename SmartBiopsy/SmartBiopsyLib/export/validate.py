"""The dciodvfy check (David Clunie's dicom3tools): errors and warnings of one DICOM file, or None when the tool
is not installed (Debian package dicom3tools)."""

from __future__ import annotations

from dataclasses import dataclass, field
import shutil
import subprocess


@dataclass
class DciodvfyResult:
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"tool": "dciodvfy", "errors": len(self.errors), "warnings": len(self.warnings),
                "error_lines": self.errors[:20]}


def dciodvfy_available() -> bool:
    return shutil.which("dciodvfy") is not None


def run_dciodvfy(path, timeout_s: float = 300.0) -> DciodvfyResult | None:
    """Run ``dciodvfy`` on ``path``; None when the tool is absent."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        return None
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=timeout_s, errors="replace")
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    res = DciodvfyResult()
    for ln in lines:
        if ln.startswith("Error"):
            res.errors.append(ln.strip())
        elif ln.startswith("Warning"):
            res.warnings.append(ln.strip())
    return res

"""``smartbiopsy capsules`` as a user runs it, on a small synthetic CT written as NRRD."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import smartbiopsy

ROOT = Path(__file__).resolve().parents[2]



def _write(vol, path):
    import SimpleITK as sitk

    sitk.WriteImage(vol.to_sitk(), str(path))
    return path


def test_capsules_command_prints_json(tmp_path):
    from test_capsules import synthetic_ct

    vol, truth = synthetic_ct([(30, -20, (0.2, 0, 0.5)), (60, 0, (0, 0.3, 0)), (90, 20, (0, 0, 0))])
    path = _write(vol.with_array(np.round(vol.array).astype(np.int16)), tmp_path / "ct.nrrd")
    proc = smartbiopsy("capsules", path, "--modality", "ct", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    found = np.array([c["centre_ras"] for c in out["capsules"]])
    assert out["count"] == 3 and out["modality"] == "ct"
    d = np.linalg.norm(found[:, None] - truth[None], axis=2).min(axis=1)
    assert np.all(d < 0.5), d
    assert all(len(c["fle_mm"]) == 3 and 0 < c["confidence"] <= 1 for c in out["capsules"])


def test_capsules_command_reports_missing_capsules_in_one_line(tmp_path):
    from test_capsules import synthetic_ct

    vol, _ = synthetic_ct([])
    path = _write(vol, tmp_path / "ct.nrrd")
    proc = smartbiopsy("capsules", path, "--modality", "ct")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "no skin capsules found in the CT" in err[0], proc.stderr


def test_capsules_command_unreadable_file(tmp_path):
    bad = tmp_path / "broken.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\n")
    proc = smartbiopsy("capsules", bad, "--modality", "mr")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr

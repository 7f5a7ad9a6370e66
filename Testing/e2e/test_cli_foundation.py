"""The command line as a user runs it: phantom, load (DICOM -> headless MRML -> .mrb), bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import smartbiopsy

ROOT = Path(__file__).resolve().parents[2]



def assert_clean_error(proc, *words):
    assert proc.returncode not in (0, None), proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1, proc.stderr
    for w in words:
        assert w.lower() in err_lines[0].lower(), err_lines[0]


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    proc = smartbiopsy("phantom", "--out", out, "--seed", 1)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["capsules"] >= 6
    return out


def test_phantom_command_writes_nrrd_dicom_and_truth(phantom_dir):
    truth = json.loads((phantom_dir / "truth" / "truth.json").read_text())
    assert truth["seed"] == 1 and len(truth["capsules_ct_ras"]) == len(truth["capsules_mri_ras"])
    assert (phantom_dir / "ct.nrrd").stat().st_size > 1_000_000
    for series in ("ct", "t2", "dwi", "dixon_water", "dixon_fat", "t1_pre", "t1_post"):
        assert any((phantom_dir / "dicom" / series).iterdir()), series


def test_load_puts_every_phantom_series_into_a_scene_bundle(phantom_dir, tmp_path):
    mrb = tmp_path / "case.mrb"
    proc = smartbiopsy("load", phantom_dir / "dicom", "--mrb", mrb, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    names = [v["node"] for v in info["volumes"]]
    assert len(names) == 1 + 1 + 4 + 2 + 2  # CT, T2, DWI x4, Dixon x2, T1 x2
    assert sorted(v["b_value"] for v in info["volumes"] if v["b_value"] is not None) == [0, 50, 400, 800]
    from SmartBiopsyCoreLib.dataio.scene_io import load_scene_bundle

    rt = load_scene_bundle(mrb)
    assert rt.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == len(names)


def test_load_refuses_empty_folder(tmp_path):
    assert_clean_error(smartbiopsy("load", tmp_path), "empty")


def test_load_refuses_non_image_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("not an image")
    assert_clean_error(smartbiopsy("load", f), "notes.txt")


def test_load_refuses_truncated_dicom(phantom_dir, tmp_path):
    series = tmp_path / "t2"
    shutil.copytree(phantom_dir / "dicom" / "t2", series)
    victim = sorted(series.iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:700])
    assert_clean_error(smartbiopsy("load", series), "truncated")


def test_load_refuses_series_with_missing_slice(phantom_dir, tmp_path):
    series = tmp_path / "ct"
    shutil.copytree(phantom_dir / "dicom" / "ct", series)
    files = sorted(series.iterdir())
    files[len(files) // 2].unlink()
    assert_clean_error(smartbiopsy("load", series), "missing")


def test_unknown_subcommand_and_missing_arguments_exit_nonzero():
    proc = smartbiopsy("phantom")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr

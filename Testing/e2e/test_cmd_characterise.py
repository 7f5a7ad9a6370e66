"""``characterise`` command on NRRD inputs (synthetic two-compartment tumour), as a user runs it."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyLib.cli import cmd_characterise
from SmartBiopsyCoreLib.errors import InputDataError


def _write(tmp_path, name, arr, grid):
    p = tmp_path / f"{name}.nrrd"
    sitk.WriteImage(RasVolume(arr, grid, name).to_sitk(), str(p))
    return str(p)


@pytest.fixture
def inputs(tmp_path):
    grid = make_grid((0, 0, 0), (1.5, 1.5, 3.0), (16, 50, 50))
    shape = (16, 50, 50)
    body = np.zeros(shape, bool)
    body[1:15, 2:48, 2:48] = True
    tum = np.zeros(shape, np.uint8)
    tum[2:14, 8:42, 8:42] = 1
    left = np.arange(50)[None, None, :] < 25
    adc = np.where(tum & left, 900.0, np.where(tum, 1900.0, 1400.0))
    ef = np.where(tum & left, 130.0, np.where(tum, 20.0, 40.0))
    files = {f"b{b}": _write(tmp_path, f"b{b}", np.where(body, 1000 * np.exp(-b * adc * 1e-6), 0).astype(np.float32), grid)
             for b in (0, 800)}
    files["pre"] = _write(tmp_path, "pre", np.where(body, 200.0, 0).astype(np.float32), grid)
    files["post"] = _write(tmp_path, "post", np.where(body, 200.0 * (1 + ef / 100), 0).astype(np.float32), grid)
    files["tumour"] = _write(tmp_path, "tumour", tum, grid)
    files["adc_mm2"] = _write(tmp_path, "adc_mm2", (adc * 1e-6).astype(np.float32), grid)
    return files, tmp_path


def _args(argv):
    ap = argparse.ArgumentParser()
    cmd_characterise.register(ap.add_subparsers())
    return ap.parse_args(argv)


def test_characterise_writes_all_outputs(inputs):
    f, tmp = inputs
    out = tmp / "out"
    args = _args(["characterise", "--dwi", f"0={f['b0']}", f"800={f['b800']}", "--t1-pre", f["pre"],
                  "--t1-post", f["post"], "--tumour", f["tumour"], "--out", str(out)])
    assert args.func(args) == 0
    for name in ("adc.nrrd", "ef.nrrd", "habitats.nrrd", "regions.csv", "targets.json", "radiomics.csv"):
        assert (out / name).stat().st_size > 0
    t = json.loads((out / "targets.json").read_text())["targets"]
    assert [x["region"] for x in t] == ["A", "C"]
    assert abs(t[0]["signature"]["adc"]["mean"] - 900) < 20 and abs(t[1]["signature"]["ef"]["mean"] - 20) < 2
    hab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "habitats.nrrd")))
    assert set(np.unique(hab)) == {0, 1, 3}


def test_characterise_stops_on_adc_in_wrong_units(inputs):
    f, tmp = inputs
    args = _args(["characterise", "--adc", f["adc_mm2"], "--t1-pre", f["pre"], "--t1-post", f["post"],
                  "--tumour", f["tumour"], "--out", str(tmp / "o2"), "--no-radiomics"])
    with pytest.raises(InputDataError, match="mm\\^2/s"):
        args.func(args)

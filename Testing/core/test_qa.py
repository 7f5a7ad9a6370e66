"""Registration QA report: thresholds, qa.json, fused pictures."""
from __future__ import annotations

import json

import numpy as np
import pytest

from RegistrationFusionLib.registration import landmarks as L
from RegistrationFusionLib.registration import qa
from RegistrationFusionLib.errors import RegistrationFusionError
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid, resample


def _registration(noise=0.2, seed=0):
    rng = np.random.default_rng(seed)
    z = np.array([-30.0, -10, 10, 30])
    ct = np.array([[x, 100.0, zz - (7 if x > 0 else 0)] for x in (-30, 30) for zz in z])
    mr = ct + rng.normal(0, noise, ct.shape)
    return L.register_points(ct, mr, fle_ct=0.3, fle_mri=[0.4, 0.4, 1.5])


def test_report_passes_and_lists_target_tre(tmp_path):
    reg = _registration()
    rep = qa.build_report(reg, {"A": [0, 0, 0], "B": [10, -5, 12]})
    assert rep.passed, rep.failures
    assert [t.name for t in rep.targets] == ["A", "B"]
    assert np.allclose([t.predicted_tre_mm for t in rep.targets], reg.predicted_tre(np.array([[0, 0, 0], [10, -5, 12.0]])))
    path = rep.write_json(tmp_path / "qa.json")
    d = json.loads(open(path).read())
    assert d["passed"] is True and d["fre_mm"] == pytest.approx(reg.fre_mm)
    assert len(d["markers"]) == 8 and d["targets"][1]["name"] == "B"


def test_report_fails_with_reasons_against_thresholds():
    reg = _registration()
    th = qa.QAThresholds(max_fre_mm=0.01, max_predicted_tre_mm=0.5)
    rep = qa.build_report(reg, np.array([[0, 0, 0.0]]), thresholds=th)
    assert not rep.passed
    assert any("FRE" in f for f in rep.failures)
    assert any("predicted TRE" in f and "T1" in f for f in rep.failures)


def test_fusion_pictures_are_written(tmp_path):
    # without matplotlib (desktop Slicer before the install) see test_optional_packages.py
    pytest.importorskip("matplotlib", reason="matplotlib is not installed here")
    grid = make_grid((-40, -40, -20), (2, 2, 4), (11, 40, 40))
    k, j, i = np.indices((11, 40, 40))
    ct = RasVolume(np.where((i - 20) ** 2 + (j - 20) ** 2 < 150, 50.0, -1000.0), grid, "ct")
    mr = RasVolume(np.where((i - 21) ** 2 + (j - 20) ** 2 < 150, 300.0, 0.0), grid, "t2")
    on_ct = resample(mr, ct, np.eye(4))
    paths = qa.write_fusion_pictures(ct, on_ct, [0.0, 0.0, 0.0], tmp_path)
    for p in paths.values():
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(RegistrationFusionError, match="outside the CT"):
        qa.write_fusion_pictures(ct, on_ct, [500.0, 0, 0], tmp_path)
    with pytest.raises(RegistrationFusionError, match="resampled onto the CT grid"):
        qa.write_fusion_pictures(ct, RasVolume(mr.array[:, :, :-1], grid), [0, 0, 0], tmp_path)

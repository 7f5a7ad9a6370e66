"""Inside the Slicer it targets: without matplotlib and pyradiomics everything else completes and says what is
missing; drawing never touches matplotlib's global state; every library module imports without them.

Runs in the main environment (the packages made unimportable per test) and in the Slicer-package environment
(scripts/test-slicer-env.sh), where they are absent for real.
"""
from __future__ import annotations

import csv
import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blocked_imports import NOT_IN_SLICER, block_imports, blocker_source
from SmartBiopsyCoreLib.errors import SmartBiopsyError
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid, resample
from SmartBiopsyCoreLib.optional import MissingPackageError, available

ROOT = Path(__file__).resolve().parents[2]
LIBS = {"SmartBiopsyCore": "SmartBiopsyCoreLib", "RegistrationFusion": "RegistrationFusionLib",
        "TrajectoryPlanner": "TrajectoryPlannerLib", "SmartBiopsy": "SmartBiopsyLib"}
needs_matplotlib = pytest.mark.skipif(not available("matplotlib"), reason="matplotlib is not installed here")


def _ct_and_mri_on_ct():
    grid = make_grid((-40, -40, -20), (2, 2, 4), (11, 40, 40))
    k, j, i = np.indices((11, 40, 40))
    ct = RasVolume(np.where((i - 20) ** 2 + (j - 20) ** 2 < 150, 50.0, -1000.0), grid, "ct")
    mr = RasVolume(np.where((i - 21) ** 2 + (j - 20) ** 2 < 150, 300.0, 0.0), grid, "t2")
    return ct, resample(mr, ct, np.eye(4))


def test_radiomics_table_says_not_available_without_pyradiomics(monkeypatch, tmp_path):
    block_imports(monkeypatch, "radiomics")
    from SmartBiopsyLib.characterise import radiomics

    grid = make_grid((0, 0, 0), (1.5, 1.5, 3.0), (6, 20, 20))
    lab = np.zeros((6, 20, 20), np.uint8)
    lab[1:5, 2:18, 2:8], lab[1:5, 2:18, 8:14], lab[1:5, 2:18, 14:18] = 1, 2, 3
    maps = {"adc": RasVolume(np.full(lab.shape, 1200.0, np.float32), grid),
            "ef": RasVolume(np.full(lab.shape, 40.0, np.float32), grid)}
    rows = radiomics.compute_radiomics(RasVolume(lab, grid), maps)
    assert [(r.region, r.map_name) for r in rows] == [(g, m) for g in "ABC" for m in ("adc", "ef")]
    assert all(not r.features and r.error == radiomics.NOT_AVAILABLE for r in rows)
    assert "Radiomic features not available: install SlicerRadiomics" in radiomics.NOT_AVAILABLE
    text = Path(radiomics.write_radiomics_csv(rows, tmp_path / "radiomics.csv")).read_text()
    assert text.count("install SlicerRadiomics") == len(rows)


def test_fusion_pictures_without_matplotlib_raise_one_sentence_and_write_nothing(monkeypatch, tmp_path):
    block_imports(monkeypatch, *NOT_IN_SLICER)
    from RegistrationFusionLib.registration import qa

    ct, on_ct = _ct_and_mri_on_ct()
    with pytest.raises(MissingPackageError) as err:
        qa.write_fusion_pictures(ct, on_ct, [0.0, 0.0, 0.0], tmp_path / "pictures")
    msg = str(err.value)
    assert isinstance(err.value, SmartBiopsyError) and "\n" not in msg
    assert msg.startswith("Fusion pictures not available:") and "pip install matplotlib" in msg
    assert not (tmp_path / "pictures").exists()


def test_report_without_matplotlib_says_which_figures_are_missing_and_why(monkeypatch, tmp_path):
    from report_case import build_case
    from test_report import EXPECTED_FIGURES

    build_case(tmp_path)
    # the calibration picture is drawn by the calibration itself; without matplotlib it would not exist either
    (tmp_path / "robot" / "calibration" / "calibration.png").unlink(missing_ok=True)
    block_imports(monkeypatch, *NOT_IN_SLICER)
    from SmartBiopsyLib.report.case import SECTION_TITLES
    from SmartBiopsyLib.report.writer import write_report

    text = html.unescape(Path(write_report(tmp_path)).read_text(encoding="utf-8"))
    for title in SECTION_TITLES:
        assert f">{title}</h2>" in text
    assert "could not be drawn" not in text  # no section fell over
    assert "data:image/png" not in text and not list((tmp_path / "figures").glob("*.png"))
    why = "Report figures not available: accept the matplotlib install the module offers in 3D Slicer"
    notes = re.findall(r'<p class="na">Figure not drawn: (.*?)</p>', text)
    assert len(notes) == len(EXPECTED_FIGURES) and all(why in n for n in notes)
    top = re.search(r'<p class="na">(\d+) figures not drawn \(([^)]*)\): ' + re.escape(why), text)
    assert top and int(top.group(1)) == len(EXPECTED_FIGURES)
    assert sorted(top.group(2).split(", ")) == sorted(EXPECTED_FIGURES)
    # the numbers are all still there: QA, regions, trajectories, notch values, specimens
    for header in ("residual (mm)", "volume (ml)", "length (mm)", "coverage", "predicted TRE (mm)"):
        assert f"<th>{header}</th>" in text, header


def test_demo_completes_without_pyradiomics_and_the_report_says_so(monkeypatch, tmp_path):
    block_imports(monkeypatch, "radiomics")
    from SmartBiopsyLib.characterise.radiomics import NOT_AVAILABLE
    from SmartBiopsyLib.cli.main import main

    out = tmp_path / "demo"
    assert main(["--quiet", "demo", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [
        (n, "done") for n in ("load", "fuse", "characterise", "plan", "calibrate", "robot", "sample", "record", "scene",
                                "report")]
    assert NOT_AVAILABLE in summary["lines"]
    rows = list(csv.DictReader((out / "characterisation" / "radiomics.csv").open()))
    assert {r["region"] for r in rows} == {"A", "B", "C"} and all(r["error"] == NOT_AVAILABLE for r in rows)
    text = html.unescape((out / "report.html").read_text(encoding="utf-8"))
    assert NOT_AVAILABLE in text
    assert ("Figure not drawn" in text) == (not available("matplotlib"))  # the Slicer-package environment
    assert (out / "scene.mrb").is_file()


def test_every_library_module_imports_without_optional_packages():
    """Heavy and optional imports live inside the functions that need them (a fresh interpreter)."""
    names = []
    for module, lib in LIBS.items():
        for path in sorted((ROOT / module / lib).rglob("*.py")):
            if path.name == "__main__.py":  # runs the command line when imported
                continue
            rel = path.relative_to(ROOT / module).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            names.append(".".join(parts))
    code = blocker_source(NOT_IN_SLICER + ("pyigtl", "crcmod")) + (
        "import importlib, sys\n"
        f"sys.path[:0] = {[str(ROOT / m) for m in LIBS]!r}\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("imported"), proc.stderr[-3000:]


@needs_matplotlib
def test_drawing_leaves_the_global_matplotlib_backend_and_pyplot_alone(tmp_path):
    import matplotlib

    from RegistrationFusionLib.registration import qa
    from SmartBiopsyLib.report.figures import FigureStore

    before = matplotlib.get_backend()
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    try:
        matplotlib.use("svg")
        ct, on_ct = _ct_and_mri_on_ct()
        qa.write_fusion_pictures(ct, on_ct, [0.0, 0.0, 0.0], tmp_path)
        store = FigureStore(tmp_path / "figures")
        fig = store.new(4, 3)
        fig.add_subplot(111).plot([0, 1], [1, 0])
        store.save(fig, "line", "a line")
        assert matplotlib.get_backend() == "svg"
        assert pyplot_loaded or "matplotlib.pyplot" not in sys.modules
    finally:
        matplotlib.use(before)

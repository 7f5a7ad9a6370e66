"""The panel's "Export for PACS and pathology" (SmartBiopsyLib.logic.BiopsyLogic.export_for_hospital, what the
widget calls) on a real headless scene: the case folder, its DICOM/FHIR export and the report listing it."""
import ast
import tempfile
from pathlib import Path

import pytest

from SmartBiopsyLib import logic, scenarios

ROOT = Path(__file__).resolve().parents[2]


def test_export_button_writes_the_export_and_the_report_lists_it(scene):
    pytest.importorskip("highdicom")
    pytest.importorskip("fhir.resources")
    folder = Path(tempfile.mkdtemp(prefix="smartbiopsy-gui-export-"))
    out = scenarios.gui_case(scene, folder)
    pn, lg = out["pn"], out["logic"]
    assert logic.button_states(pn)["exportHospital"]
    result = lg.export_for_hospital(pn.reportFolder, pn, accession=" ACC-9 ")
    root = Path(pn.reportFolder)
    kinds = [o.kind for o in result.objects]
    assert "seg" in kinds and "pm" in kinds and "sr" in kinds and "fhir" in kinds
    for o in result.objects:
        assert (root / "export" / o.path).is_file()
        assert not o.validation.get("errors"), o.to_dict()
    accs = sorted(o.content["accession"] for o in result.objects if o.kind == "fhir")
    assert accs[0] == "ACC-9" and all(a.startswith("ACC-9") for a in accs)
    html = (root / "report.html").read_text(encoding="utf-8")
    assert "Hospital export (export/)" in html


def test_widget_wires_the_export_button_to_the_logic():
    src = (ROOT / "SmartBiopsy" / "SmartBiopsy.py").read_text()
    tree = ast.parse(src)
    assert 'self.ui.exportHospitalButton.connect("clicked(bool)", self.onExportHospital)' in src
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "onExportHospital")
    body = ast.unparse(fn)
    assert "self.logic.exportForHospital" in body and "tryWithErrorDisplay" in body
    assert "accession=pn.exportAccession" in src
    assert 'name="exportHospitalButton"' in (ROOT / "SmartBiopsy" / "Resources" / "UI" / "SmartBiopsy.ui").read_text()

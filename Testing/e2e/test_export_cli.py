"""Command line: ``smartbiopsy export --case DIR --out DIR`` on a small case folder built with the project's own
writers (Testing/core/report_case.py), then ``specimens import-pathology`` keyed by accession number and the
report listing what was exported."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import smartbiopsy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    pytest.importorskip("highdicom")
    pytest.importorskip("fhir.resources")
    from report_case import build_case
    from SmartBiopsyCoreLib.dataio.imageio import save_image
    from SmartBiopsyCoreLib.phantom import abdomen as synthetic

    root = tmp_path_factory.mktemp("cli")
    build_case(root / "case")
    _ct, labels, _t = synthetic.make_abdomen(spacing=(3.0, 3.0, 4.0), fov_mm=(360.0, 300.0, 120.0))
    save_image(labels, root / "risk.nrrd")
    return root


def test_export_writes_valid_objects_and_the_manifest(case):
    out = case / "export"
    res = smartbiopsy("export", "--case", case / "case", "--out", out, "--risk", f"{case / 'risk.nrrd'}:4=aorta,6=kidney",
                      "--accession", "ACC-77")
    assert res.returncode == 0, res.stderr
    assert "exported 2 segmentations, 3 parametric maps, 1 measurement report" in res.stdout
    assert "NOT the patient's original series" in res.stdout
    m = json.loads((out / "manifest.json").read_text())
    kinds = sorted(o["kind"] for o in m["objects"])
    assert kinds.count("seg") == 2 and kinds.count("pm") == 3 and kinds.count("sr") == 1 and kinds.count("fhir") >= 3
    for o in m["objects"]:
        assert (out / o["path"]).is_file()
        if o["kind"] in ("seg", "pm", "sr") and "skipped" not in o["validation"]:
            assert o["validation"]["errors"] == 0, o
    risk = next(o for o in m["objects"] if o["path"].endswith("seg_risk.dcm"))
    assert [s["label"] for s in risk["content"]["segments"]] == ["aorta", "kidney"]


def test_pathology_by_accession_number_through_the_command_line(case):
    out = case / "export"
    if not (out / "fhir" / "accessions.csv").is_file():
        pytest.skip("export did not run")
    rows = (out / "fhir" / "accessions.csv").read_text().splitlines()[1:]
    lab = case / "lab.csv"
    lab.write_text("accession_number,ki67_percent\n" + "".join(f"{r.split(',')[0]},{20 + n}\n" for n, r in enumerate(rows)))
    res = smartbiopsy("specimens", "import-pathology", "--journal", case / "case" / "specimens" / "journal.jsonl",
                      "--csv", lab, "--accessions", out / "fhir" / "accessions.csv")
    assert res.returncode == 0, res.stderr
    res = smartbiopsy("specimens", "show", "--journal", case / "case" / "specimens" / "journal.jsonl")
    state = json.loads(res.stdout)
    for n, r in enumerate(rows):
        pot = r.split(",")[1]
        assert state["pathology"][pot]["ki67_percent"] == 20 + n


def test_export_of_a_folder_without_a_case_is_a_one_sentence_error(tmp_path):
    res = smartbiopsy("export", "--case", tmp_path, "--out", tmp_path / "o")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in res.stderr


def test_report_lists_what_was_exported(case):
    from SmartBiopsyLib.report.writer import write_report

    if not (case / "export" / "manifest.json").is_file():
        pytest.skip("export did not run")
    import shutil

    shutil.copytree(case / "export", case / "case" / "export", dirs_exist_ok=True)
    html = Path(write_report(case / "case")).read_text(encoding="utf-8")
    assert "Hospital export (export/)" in html and "dicom/seg_tumour_habitats.dcm" in html
    assert "dciodvfy" in html

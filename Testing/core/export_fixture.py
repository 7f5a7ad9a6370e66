"""A small case folder (Testing/core/report_case.py, built with the project's writers) plus its risk label map,
exported once per test module with SmartBiopsyLib.export.case.export_case."""
from __future__ import annotations

from pathlib import Path

import pytest


def build_and_export(root: Path, accession: str = "ACC-2024-0042"):
    from report_case import build_case
    from SmartBiopsyCoreLib.phantom import abdomen as synthetic
    from SmartBiopsyLib.export.case import export_case

    pytest.importorskip("highdicom")
    pytest.importorskip("fhir.resources")
    case = root / "case"
    facts = build_case(case)
    _ct, labels, _t = synthetic.make_abdomen(spacing=(3.0, 3.0, 4.0), fov_mm=(360.0, 300.0, 120.0))
    risk = [(labels, dict(synthetic.RISK_LABELS))]
    out = root / "export"
    res = export_case(case, out, risk_labelmaps=risk, accession=accession)
    return case, out, res, facts, labels

"""The case report (SmartBiopsyLib.report.writer): sections, embedded real figures, 'not available' reasons."""
from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from report_case import build_case, set_stage
from SmartBiopsyLib.report import figures as report_figures
from SmartBiopsyLib.report.case import SECTION_TITLES
from SmartBiopsyLib.report.figures import figure_checks
from SmartBiopsyLib.report.writer import write_report
from SmartBiopsyCoreLib.optional import available

HAVE_MATPLOTLIB = available("matplotlib")
#: Without matplotlib (Slicer's own packages) the figures are replaced by notes: test_optional_packages.py.
needs_matplotlib = pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed here")
#: What stands where a figure is: the embedded picture, or the note saying it was not drawn and why.
FIGURE_MARK = "data:image/png" if HAVE_MATPLOTLIB else "Figure not drawn:"

EXPECTED_FIGURES = ("stage_times", "fusion_checkerboard", "fusion_overlay", "fusion_residuals", "habitats_targets",
                    "trajectories_reslice", "trajectories_3d", "notch_rois", "procedure_timeline", "heterogeneity")


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("case")
    facts = build_case(root)
    return root, facts


@pytest.fixture(scope="module")
def full_report(case_dir):
    root, facts = case_dir
    path = write_report(root)
    return Path(path), Path(path).read_text(encoding="utf-8"), facts


def _copy(case_dir, tmp_path) -> Path:
    dst = tmp_path / "case"
    shutil.copytree(case_dir[0], dst, ignore=shutil.ignore_patterns("report.html", "figures"))
    return dst


def _section(text: str, number: int) -> str:
    start = text.index(f'<h2 id="s{number}">')
    end = text.find('<h2 id="s', start + 5)
    return text[start:end if end > 0 else None]


def _assert_self_contained(text: str):
    assert not re.search(r"https?://|ftp://", text)
    for m in re.finditer(r'\b(?:src|href)\s*=\s*"([^"]*)"', text):
        assert m.group(1).startswith(("data:image/png;base64,", "#")), m.group(1)[:60]
    assert "<script" not in text and "<link" not in text and "@import" not in text


@needs_matplotlib
def test_report_has_every_section_and_every_figure_embedded(full_report):
    path, text, _ = full_report
    assert path.name == "report.html"
    for title in SECTION_TITLES:
        assert f">{title}</h2>" in text
    figs = path.parent / "figures"
    names = sorted(p.stem for p in figs.glob("*.png"))
    assert set(EXPECTED_FIGURES) <= set(names)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(embedded) == len(names)
    for name in names:  # the file on disk is the picture in the HTML
        assert base64.b64encode((figs / f"{name}.png").read_bytes()).decode() in embedded, name
    assert "not available" not in text
    assert "could not be drawn" not in text
    _assert_self_contained(text)


@needs_matplotlib
def test_every_figure_is_a_real_picture(full_report):
    path, _, _ = full_report
    for png in sorted((path.parent / "figures").glob("*.png")):
        res = figure_checks(png)
        assert res["ok"], (png.name, res)
        assert res["width"] > 200 and res["height"] > 150


def test_tables_carry_the_numbers_of_the_artefacts(full_report, case_dir):
    _, text, facts = full_report
    root = case_dir[0]
    fusion = json.loads((root / "registration" / "fusion.json").read_text())
    s2 = _section(text, 2)
    assert f"FRE {fusion['qa']['fre_mm']:.2f} mm" in s2
    for t in fusion["qa"]["targets"]:
        assert t["name"] in s2 and f"{t['predicted_tre_mm']:.2f}" in s2
    s5 = _section(text, 5)
    for d in (root / "sampling").iterdir():
        if d.is_dir():
            vals = json.loads((d / "notch.json").read_text())["values"]
            for name, st in vals["maps"].items():
                assert f"{st['mean']:.1f}" in s5 and f"{st['sd']:.1f}" in s5, (d.name, name)
    for d in (root / "sampling").iterdir():
        if d.is_dir():
            det = json.loads((d / "needle.json").read_text())["detection"]
            assert f"{det['tip_error_mm']:.1f}" in s5 and f"{det['lateral_error_mm']:.1f}" in s5
    s4 = _section(text, 4)
    for t in facts["trajectories"]:
        assert t["name"] in s4 and f"{t['length_mm']:.1f}" in s4
    s6 = _section(text, 6)
    for t in facts["trajectories"]:
        assert f"POT-{t['region']}" in s6
    s8 = _section(text, 8)
    assert "simulated pathology (phantom demo)" in s8
    s1 = _section(text, 1)
    proc = json.loads((root / "specimens" / "procedure.json").read_text())
    assert f"{proc['total_dlp_mgy_cm']:.1f} mGy*cm" in s1
    assert f"{proc['elapsed_min']:.1f} min of the 60 min window" in s1
    assert "report-test" in s1 and "321 MB" in s1


def test_failed_step_makes_later_sections_say_why(case_dir, tmp_path):
    root = _copy(case_dir, tmp_path)
    for sub in ("plan", "robot", "sampling", "specimens"):
        shutil.rmtree(root / sub)
    msg = "no safe path to Target B: the bowel lies across every candidate"
    set_stage(root, "plan", "failed", msg)
    # user-supplied targets carry only the CT point: the MRI point comes back through the fusion
    tdoc = json.loads((root / "characterisation" / "targets.json").read_text())
    for t in tdoc["targets"]:
        t.pop("point_ras")
    (root / "characterisation" / "targets.json").write_text(json.dumps(tdoc))
    m = np.linalg.inv(np.asarray(json.loads((root / "registration" / "fusion.json").read_text())
                                 ["matrix_mri_to_ct_ras"]))
    text = Path(write_report(root)).read_text(encoding="utf-8")
    for title in SECTION_TITLES:
        assert f">{title}</h2>" in text
    s4 = _section(text, 4)
    assert f"not available (step plan did not finish: {msg})" in s4
    for n in (5, 6, 7):  # later steps were skipped: their sections name the failed step and its message
        s = _section(text, n)
        assert "not available" in s and msg in s, n
    assert f"not available (step specimens did not finish: skipped because step plan failed: {msg}" \
        in _section(text, 8)
    s3 = _section(text, 3)
    for t in tdoc["targets"]:
        p = m[:3, :3] @ np.asarray(t["point_ct_ras"]) + m[:3, 3]
        assert " ".join(f"{v:.1f}" for v in p) in s3
    for n in (2, 3):  # what finished is still reported with its pictures
        s = _section(text, n)
        assert "not available (" not in s and FIGURE_MARK in s
    for png in (root / "figures").glob("*.png"):
        assert figure_checks(png)["ok"], png.name
    assert not (root / "figures" / "trajectories_3d.png").exists()
    _assert_self_contained(text)


def test_unreadable_artefact_names_the_file_and_real_pathology_is_not_called_synthetic(case_dir, tmp_path):
    root = _copy(case_dir, tmp_path)
    (root / "registration" / "fusion.json").write_text('{"matrix_mri_to_ct_ras": [[1, 0')
    (root / "registration" / "qa.json").unlink()
    s = json.loads((root / "summary.json").read_text())
    s["case"]["synthetic"] = False
    (root / "summary.json").write_text(json.dumps(s))
    text = Path(write_report(root)).read_text(encoding="utf-8")
    s2 = _section(text, 2)
    assert "not available (registration/fusion.json could not be read" in s2
    assert FIGURE_MARK in s2  # the fused pictures come from the volumes, not the JSON
    s8 = _section(text, 8)
    assert "synthetic" not in s8 and FIGURE_MARK in s8


def test_empty_folder_still_gives_a_report(tmp_path):
    text = Path(write_report(tmp_path / "nothing")).read_text(encoding="utf-8")
    for n, title in enumerate(SECTION_TITLES, start=1):
        assert f">{title}</h2>" in text
        if n > 1:
            assert "not available" in _section(text, n), n
    assert "summary.json" in _section(text, 1)
    assert "data:image/png" not in text
    _assert_self_contained(text)


@needs_matplotlib
def test_figure_checks_rejects_blank_tiny_and_non_png(tmp_path):
    from matplotlib import image as mpimg

    blank = np.ones((300, 400, 3))
    mpimg.imsave(tmp_path / "blank.png", blank)
    rng = np.random.default_rng(0)
    mpimg.imsave(tmp_path / "tiny.png", rng.random((60, 80, 3)))
    mpimg.imsave(tmp_path / "rich.png", rng.random((300, 400, 3)))
    two = np.zeros((300, 400, 3))
    two[:, 200:] = 1.0
    mpimg.imsave(tmp_path / "two_colours.png", two)
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "rich.png").read_bytes()[:200])
    assert figure_checks(tmp_path / "rich.png")["ok"]
    r = figure_checks(tmp_path / "blank.png")
    assert r["decodes"] and not r["ok"] and r["std"] < 0.01
    r = figure_checks(tmp_path / "tiny.png")
    assert not r["ok"] and (r["width"], r["height"]) == (80, 60)
    r = figure_checks(tmp_path / "two_colours.png")
    assert not r["ok"] and r["colours"] == 2
    for bad in ("text.png", "truncated.png"):
        r = figure_checks(tmp_path / bad)
        assert not r["ok"] and not r["decodes"], bad


def test_reslice_follows_the_volume_geometry():
    from SmartBiopsyCoreLib.geometry import RasVolume, make_grid

    # a volume whose value is its R coordinate, on an oblique grid
    a = np.radians(30)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    m = make_grid([-20.0, -20.0, -10.0], (1.0, 1.0, 2.0), (12, 40, 40), rot)
    vol = RasVolume(np.zeros((12, 40, 40), np.float32), m)
    kk, jj, ii = np.indices(vol.array.shape)
    ras = vol.ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1))
    vol.array[:] = ras[:, 0].reshape(vol.array.shape)
    centre = np.array([-2.0, 8.0, 0.0])
    img = report_figures.reslice(vol, centre, [1.0, 0, 0], [0, 1.0, 0], 5.0, 4.0, 0.5, order=1)
    assert img.shape == (17, 21)
    expected = centre[0] + np.linspace(-5, 5, 21)
    assert np.allclose(img, expected[None, :], atol=1e-3)
    far = report_figures.reslice(vol, centre + 500.0, [1.0, 0, 0], [0, 1.0, 0], 5.0, 4.0)
    assert np.isnan(far).all()


def test_summary_section_lists_the_warnings_that_matter_or_says_the_acceptance_was_met(tmp_path):
    """The run's verdict (summary.json ``acceptance``) is in the report, each warning that matters on its own row."""
    import html as _html

    from SmartBiopsyLib.report.case import CaseFolder
    from SmartBiopsyLib.report.figures import FigureStore
    from SmartBiopsyLib.report.sections.summary import section_summary

    def rows(acceptance):
        (tmp_path / "summary.json").write_text(json.dumps({"case": {"name": "X"}, "stages": [],
                                                            "acceptance": acceptance}))
        text = section_summary(CaseFolder(tmp_path), FigureStore(tmp_path / "figs"))
        cells = [_html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", text, re.S)]
        return list(zip(cells[::2], cells[1::2]))

    tip = "target B: needle tip 8.2 mm from its planned position (tolerance 5 mm)"
    bad = rows({"met": False, "warnings_that_matter": [tip, "registration QA failed (FRE 2.1 mm > 1.5 mm)"]})
    assert ("acceptance", "NOT MET: 2 warning(s) that matter") in bad
    assert ("warning that matters", tip) in bad
    assert ("warning that matters", "registration QA failed (FRE 2.1 mm > 1.5 mm)") in bad
    good = rows({"met": True, "warnings_that_matter": []})
    assert ("acceptance", "every step that ran met its acceptance") in good
    assert not any(k == "warning that matters" for k, _ in good)

"""The case report: one self-contained ``report.html`` (plus every figure as PNG) from a case output folder.

Core module: numpy, scipy, matplotlib (Agg canvas, no pyplot state), optionally vtk to read the skin model;
no ``slicer``. :func:`write_report` reads the folder the workflow writes (layout below), draws every figure
from the data itself, embeds the figures as base64 PNG with inline CSS (no external resource, no URL) and
writes the same pictures to ``<out_dir>/figures/``.

Folder layout read (RAS mm everywhere; CT world = planning CT, MRI world = the anatomical MRI's world;
``matrix_mri_to_ct_ras`` maps MRI-world points to CT-world points)::

    summary.json                       case, stages [{name, status, seconds, message}], peak_memory_mb
    inputs/ct.nrrd, inputs/mri_t2.nrrd
    registration/fusion.json, qa.json, t2_on_ct.nrrd
    characterisation/adc.nrrd ff.nrrd ef.nrrd habitats.nrrd tumour.nrrd regions.csv targets.json
    plan/plan.json, plan/skin_model.vtp (optional)
    robot/session.json
    sampling/<target>/needle.json, notch.json; sampling/notch_values.json
    specimens/specimens.csv, procedure.json, pathology.csv (optional)

Robustness: the report never fails because an artefact is missing or unreadable; the section then says
``not available (step <stage> did not finish: <message from summary.json>)`` (see :func:`write_report`).
Optional packages: without matplotlib every figure is replaced by a sentence saying it was not drawn and why,
and without pyradiomics the radiomics table carries the "not available: install SlicerRadiomics" sentence;
a note under the title lists what is missing (:func:`optional_parts_note`).
Sections are matched to workflow stages by the keywords in :data:`SECTION_STAGE_KEYWORDS`.
"""

from __future__ import annotations

from pathlib import Path
import datetime as _dt
import logging

from SmartBiopsyLib.report.case import SECTION_TITLES, CaseFolder
from SmartBiopsyLib.report.figures import FigureStore
from SmartBiopsyLib.report.html import HEAD_META, REPORT_CSS, esc, na_note
from SmartBiopsyLib.report.sections.fusion import section_fusion
from SmartBiopsyLib.report.sections.habitats import section_habitats
from SmartBiopsyLib.report.sections.heterogeneity import section_heterogeneity
from SmartBiopsyLib.report.sections.notch import section_notch
from SmartBiopsyLib.report.sections.procedure import section_procedure
from SmartBiopsyLib.report.sections.specimens import section_specimens
from SmartBiopsyLib.report.sections.summary import section_summary
from SmartBiopsyLib.report.sections.trajectories import section_trajectories

logger = logging.getLogger(__name__)


_SECTIONS = (section_summary, section_fusion, section_habitats, section_trajectories, section_notch,
             section_specimens, section_procedure, section_heterogeneity)

#: sections (indices into the report's sections) that read only what the workflow's steps up to 'record' wrote:
#: not the step table and total time (summary) nor the hospital export (specimens). The workflow draws them
#: while the scene is built (:func:`draw_sections` in a child process) and hands them to :func:`write_report`.
EARLY_SECTIONS = (1, 2, 3, 4, 6, 7)


def _draw_section(i: int, case: CaseFolder, figs: FigureStore) -> str:
    heading, fn = SECTION_TITLES[i], _SECTIONS[i]
    try:
        return fn(case, figs)
    except Exception as exc:  # noqa: BLE001 - the report must still be written
        logger.exception("report section '%s' failed", heading)
        return na_note(f"not available (this section could not be drawn: {type(exc).__name__}: {exc})")


def draw_sections(out_dir, indices=EARLY_SECTIONS) -> dict:
    """Sections ``indices`` of the report of ``out_dir`` drawn now, their figures written to ``figures/``:
    {index: (body HTML, figure paths, names of the figures not drawn)} for ``write_report(drawn=...)``."""
    root = Path(out_dir)
    case = CaseFolder(root)
    out = {}
    for i in indices:
        figs = FigureStore(root / "figures")
        out[i] = (_draw_section(i, case, figs), list(figs.paths), list(figs.missing))
    return out


def write_report(out_dir, title: str | None = None, drawn: dict | None = None) -> str:
    """Write ``<out_dir>/report.html`` (self-contained) and ``<out_dir>/figures/*.png``; return the HTML path.

    Reads the case output folder described in the module docstring. A missing or unreadable artefact never
    raises: its section says ``not available (step <stage> did not finish: <message>)`` using the stage
    messages of ``summary.json``; a section whose drawing fails says so and the rest is still written.
    ``drawn``: sections already drawn from this folder by :func:`draw_sections` (their figures written).
    """
    drawn = drawn or {}
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    case = CaseFolder(root)
    figs = FigureStore(root / "figures")
    cinfo = (case.summary.get("case") or {}) if isinstance(case.summary, dict) else {}
    title = title or f"SmartBiopsy report - {cinfo.get('name', root.name)}"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head>{HEAD_META}<title>{esc(title)}</title>"
             f"<style>{REPORT_CSS}</style></head><body><h1>{esc(title)}</h1>"]
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f'<p class="note">Written {created}. Coordinates are RAS in mm; ADC in 10^-6 mm^2/s, FF and EF '
                 "in percent.</p>")
    if cinfo.get("synthetic"):
        parts.append('<p class="na">Synthetic case (digital phantom): not patient data.</p>')
    notes_at = len(parts)
    parts.append("<ul>" + "".join(f'<li><a href="#s{i + 1}">{esc(t)}</a></li>' for i, t in enumerate(SECTION_TITLES))
                 + "</ul>")
    for i, heading in enumerate(SECTION_TITLES):
        if i in drawn:
            body, paths, missing = drawn[i]
            figs.paths += paths
            figs.missing += missing
        else:
            body = _draw_section(i, case, figs)
        parts.append(f'<section><h2 id="s{i + 1}">{esc(heading)}</h2>\n{body}</section>')
    note = optional_parts_note(case, figs)
    if note:
        parts.insert(notes_at, note)
    parts.append("</body></html>")
    path = root / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    logger.info("report written to %s (%d figures)", path, len(figs.paths))
    return str(path)


def optional_parts_note(case: CaseFolder, figs: FigureStore) -> str:
    """The note under the report title naming what optional packages left out (figures, radiomic features);
    empty when nothing is missing. Call after the sections have run (they record the figures not drawn)."""
    from SmartBiopsyLib.characterise.radiomics import NOT_AVAILABLE

    lines = []
    if figs.missing:
        lines.append(f"{len(figs.missing)} figures not drawn ({', '.join(figs.missing)}): {figs.why_not}.")
    rows = case.csv("characterisation/radiomics.csv") or []
    if rows and all((r.get("error") or "") == NOT_AVAILABLE for r in rows):
        lines.append(f"{NOT_AVAILABLE}; the radiomics table (characterisation/radiomics.csv) lists the regions "
                     "without features.")
    return "".join(na_note(line) for line in lines)

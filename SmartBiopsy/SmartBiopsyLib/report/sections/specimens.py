"""Report section: specimen pots and pathology."""

from __future__ import annotations

from SmartBiopsyLib.report.case import CaseFolder
from SmartBiopsyLib.report.figures import FigureStore
from SmartBiopsyLib.report.html import fmt_num, na_note, html_table


def _pathology(case: CaseFolder) -> dict:
    """pot_id -> {ki67_percent, nsr, fnclcc_grade} from specimens/pathology.csv (or the specimens table)."""
    out: dict[str, dict] = {}
    p = case.root / "specimens" / "pathology.csv"
    if p.is_file():
        try:
            from SmartBiopsyLib.records.specimen_journal import read_pathology_csv

            for row in read_pathology_csv(p):
                out[str(row.get("pot_id", "")).strip()] = {k: v for k, v in row.items() if k != "_line"}
        except Exception as exc:  # noqa: BLE001
            case.problems["specimens/pathology.csv"] = f"specimens/pathology.csv could not be read ({exc})"
    for r in case.csv("specimens/specimens.csv") or []:
        if r.get("ki67_percent") and r.get("pot_id") not in out:
            out[r["pot_id"]] = {k: r.get(k) for k in ("ki67_percent", "nsr", "fnclcc_grade")}
    return out


def section_specimens(case: CaseFolder, figs: FigureStore) -> str:
    from SmartBiopsyLib.report.sections.notch import demo_simulated, sampling_not_done

    rows = case.csv("specimens/specimens.csv")
    stopped = sampling_not_done(case)
    if stopped and not rows:
        return na_note(f"Specimen pots {stopped}")
    synthetic = bool((case.summary.get("case") or {}).get("synthetic"))
    if not rows and not synthetic and case.sampling_dirs():
        return na_note("No specimen pots recorded yet: the operator records each pot with 'smartbiopsy specimens "
                       "add --from-sampling sampling/<target>' (pre-filled from the measured notch values).")
    if not rows:
        return na_note("Specimen table " + case.why("specimens", "specimens/specimens.csv"))
    path = _pathology(case)
    maps = [m for m in ("adc", "ff", "ef") if any(f"{m}_mean" in r for r in rows)]
    simulated = synthetic and demo_simulated(case)
    header = (["pot", "region", "target", "time (UTC, simulated)" if simulated else "time (UTC)", "operator"]
              + [f"{m.upper()} mean ± SD" for m in maps])
    has_path = bool(path)
    if has_path:
        # a phantom has no tissue: its pathology values are synthetic wherever they appear
        header += ["Ki-67 (%), synthetic", "grade, synthetic"] if synthetic else ["Ki-67 (%)", "grade"]
    body = []
    for r in rows:
        row = [r.get("pot_id"), r.get("region"), r.get("target_name"), r.get("time_utc"), r.get("operator")]
        row += [f"{fmt_num(r.get(f'{m}_mean'))} ± {fmt_num(r.get(f'{m}_sd'))}" for m in maps]
        if has_path:
            pr = path.get(str(r.get("pot_id")), {})
            row += [fmt_num(pr.get("ki67_percent")), pr.get("fnclcc_grade") or "-"]
        body.append(row)
    out = [html_table(header, body)]
    if simulated:
        out.insert(0, '<p class="na">Simulated specimen pots (phantom demo): recorded from the simulated '
                      "confirmation CTs, not from a procedure; their times are simulated"
                      + ("; Ki-67 and grade are synthetic values from a toy model of the phantom" if has_path
                         else "") + ".</p>")
    elif synthetic and has_path:
        out.insert(0, '<p class="na">Synthetic case: Ki-67 and grade are synthetic values, not pathology.</p>')
    if not has_path:
        out.append('<p class="note">No pathology results yet (specimens/pathology.csv absent).</p>')
    out.append(_export_paragraph(case))
    return "\n".join(out)


def _export_paragraph(case: CaseFolder) -> str:
    """What the hospital export (export/manifest.json) wrote, with each DICOM object's dciodvfy result."""
    import html as _html

    m = case.json("export/manifest.json")
    if not isinstance(m, dict) or not isinstance(m.get("objects"), list):
        return '<p class="note">Hospital export: not written (run <code>smartbiopsy export</code> or the panel\'s Export button).</p>'
    items = []
    for o in m["objects"]:
        if not isinstance(o, dict):
            continue
        v = o.get("validation") or {}
        check = ("" if not v else f" (dciodvfy {v['skipped']})" if "skipped" in v
                 else f" (dciodvfy: {v.get('errors')} errors)")
        items.append(f"<li>{_html.escape(str(o.get('path')))}: {_html.escape(str(o.get('description')))}{check}</li>")
    notes = "".join(f"<li>note: {_html.escape(str(n))}</li>" for n in m.get("notes") or [])
    notes += "".join(f"<li>not exported: {_html.escape(str(n))}</li>" for n in m.get("skipped") or [])
    return (f"<p>Hospital export (export/): {len(items)} object(s) for PACS and pathology "
            f"(DICOM SEG, Parametric Maps, TID 1500 SR, FHIR R5 Specimens).</p><ul>{''.join(items)}{notes}</ul>")

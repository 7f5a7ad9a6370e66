"""Report section 1: the case summary (steps, timings, memory, truth check)."""

from __future__ import annotations

import numpy as np

from SmartBiopsyLib.report.case import CaseFolder
from SmartBiopsyLib.report.figures import FigureStore
from SmartBiopsyLib.report.html import RawHtml, esc, fmt_num, na_note, html_table


def section_summary(case: CaseFolder, figs: FigureStore) -> str:
    out = []
    s = case.summary if isinstance(case.summary, dict) else {}
    if not s:
        out.append(na_note(f"not available ({case.problems.get('summary.json', 'summary.json was not written')})"))
    c = s.get("case") or {}
    rows = [("case", c.get("name", "-")), ("source", c.get("source", "-")),
            ("synthetic data", "yes (phantom)" if c.get("synthetic") else "no")]
    rows += _acceptance_rows(s)
    rows += _provenance_rows(s)
    if s.get("peak_memory_mb") is not None:
        rows.append(("peak memory", f"{fmt_num(s.get('peak_memory_mb'), 0)} MB"))
    # one total: the number the run measured once (summary.json), the same one the console prints
    if s.get("total_seconds") is not None:
        total = float(s["total_seconds"])
        rows.append(("total time", f"{total:.1f} s" + (f" ({s['total_covers']})" if s.get("total_covers") else "")))
    else:
        total = sum(float(x.get("seconds") or 0.0) for x in case.stages)
        rows.append(("total time of the steps", f"{total:.1f} s"))
    proc = case.json("specimens/procedure.json")
    if isinstance(proc, dict):
        rows.append(("total DLP", f"{fmt_num(proc.get('total_dlp_mgy_cm'))} mGy*cm"))
        el, win = proc.get("elapsed_min"), proc.get("window_min", 60.0)
        verdict = ("-" if el is None else (f"{fmt_num(el)} min of the {fmt_num(win, 0)} min window "
                                           + ("(EXCEEDED)" if proc.get("window_exceeded") else "(within)")))
        rows.append(("procedure time", verdict))
    else:
        rows.append(("DLP and procedure window", case.why("specimens", "specimens/procedure.json")))
    out.append(html_table(("item", "value"), rows))
    out.append(truth_check_table(case))
    if case.stages:
        srows = []
        for st in case.stages:
            status = st.get("status", "")
            cls = {"done": "pass", "failed": "fail"}.get(status, "note")
            srows.append((st.get("name", ""), RawHtml(f'<span class="{cls}">{esc(status)}</span>'),
                          fmt_num(st.get("seconds"), 2), st.get("message", "")))
        out.append(html_table(("step", "status", "seconds", "message"), srows, num_cols=(2,)))
        names = [str(st.get("name", "")) for st in case.stages]
        secs = [float(st.get("seconds") or 0.0) for st in case.stages]
        colours = [{"done": "#3b7dd8", "failed": "#d93025"}.get(st.get("status"), "#9aa0a6") for st in case.stages]
        fig = figs.new(8, 0.45 * len(names) + 1.4)
        ax = fig.add_subplot(111)
        y = np.arange(len(names))
        ax.barh(y, secs, color=colours)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        for yi, sv in zip(y, secs):
            ax.text(sv, yi, f" {sv:.1f} s", va="center", fontsize=8)
        ax.set_title(f"time per step (total {total:.1f} s; blue done, red failed, grey skipped)")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        out.append(figs.save(fig, "stage_times", "Wall time of each workflow step."))
    return "\n".join(out)


def truth_check_table(case: CaseFolder) -> str:
    """The phantom truth check (synthetic cases): each accuracy line the run measured against the phantom's
    known truth (summary.json ``truth_check``), as "check | result" rows; empty for a patient's case."""
    s = case.summary if isinstance(case.summary, dict) else {}
    if not (s.get("case") or {}).get("synthetic"):
        return ""
    lines = [str(x) for x in ((s.get("truth_check") or {}).get("lines") or [])]
    head = ('<p><b>Phantom truth check</b> (digital phantom: results compared with the phantom\'s known truth, '
            "which a patient's case does not have):</p>")
    if not lines:
        return head + na_note("not available (summary.json holds no truth-check lines)")
    rows = [tuple(x.split(": ", 1)) if ": " in x else (x, "") for x in lines]
    return head + html_table(("phantom truth check", "result"), rows)


def _provenance_rows(s: dict) -> list:
    """Rows for the SmartBiopsy version and the input files' SHA-256 checksums (from summary.json)."""
    rows = [("SmartBiopsy version", s.get("version") or "not recorded")]
    for entry in s.get("inputs") or []:
        if isinstance(entry, dict) and entry.get("path"):
            name = str(entry["path"]).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
            what = f"{entry['files']} files, " if entry.get("files") else ""
            rows.append((f"input {name}", f"SHA-256 {entry.get('sha256') or '-'} ({what}{fmt_num(entry.get('bytes'), 0)} bytes)"))
    return rows


def _acceptance_rows(s: dict) -> list:
    """The run's verdict (summary.json ``acceptance``): met, or each warning that matters on its own row."""
    acc = s.get("acceptance")
    if not isinstance(acc, dict):
        return [("acceptance", "not recorded")] if s else []
    warnings = [str(w) for w in acc.get("warnings_that_matter") or []]
    if acc.get("met") is True and not warnings:
        return [("acceptance", RawHtml('<span class="pass">every step that ran met its acceptance</span>'))]
    rows = [("acceptance", RawHtml(f'<span class="fail">NOT MET: {len(warnings)} warning(s) that matter</span>'))]
    return rows + [("warning that matters", w) for w in warnings]

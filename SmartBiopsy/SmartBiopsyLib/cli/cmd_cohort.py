"""``smartbiopsy cohort --csv cohort.csv --out DIR``: heterogeneity statistics of a multiregional-biopsy cohort.

Input: a CSV with one row per biopsy site (core). Required columns: the participant ID (``--participant-col``,
default ``participant``) and the site/region label (``--site-col``, default ``site``; ``region`` is used
when there is no ``site`` column). Every other column is numeric: imaging-map values at the site (e.g.
``adc`` in 1e-6 mm^2/s, ``ff``/``ef`` in percent) and pathology values (``ki67_percent``, ``nsr``,
``fnclcc_grade``). Blank cells are missing values. Which columns are pathology is chosen with
``--pathology`` (default: those named ki67_percent/ki67/nsr/fnclcc_grade/grade); ``--maps`` selects the map
columns (default: every other numeric column).

Output in DIR:
- ``participant_summary.csv``: per participant, for every variable, the number of sites with a value, the
  mean and the range (max - min over sites; blank with fewer than two sites).
- ``cohort_stats.json``: descriptive statistics (median/IQR with the quantile method stated) of site values,
  participant means and ranges; Shapiro-Wilk per variable; Spearman rho with Fisher-z 95% CI (n and method
  stated) for every map x pathology pair at three levels - site values, participant means, participant
  ranges (site values are clustered within participants: that p-value ignores the clustering and is
  labelled so); and, when FNCLCC grade is present with both classes, ROC AUC (DeLong CI) and Youden cut-off
  of every map for grade 3 versus grades 1-2 at site level.
A statistic that cannot be computed (too few values, constant data) is reported in the JSON as
``{"not_computed": reason}`` instead of stopping the run; problems with the input file stop it with one line.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
from pathlib import Path
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)

DEFAULT_PATHOLOGY = ("ki67_percent", "ki67", "nsr", "fnclcc_grade", "grade")
GRADE_COLUMNS = ("fnclcc_grade", "grade")


def register(subparsers) -> None:
    from SmartBiopsyLib.cli.helptext import plain_help

    p = subparsers.add_parser(
        "cohort", help="per-participant heterogeneity summary and imaging-pathology statistics from a site CSV",
        description=plain_help(__doc__.split("\n\n", 1)[1]), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--csv", required=True, help="cohort CSV, one row per biopsy site")
    p.add_argument("--out", required=True, help="output folder (created): participant_summary.csv, cohort_stats.json")
    p.add_argument("--participant-col", default="participant", help="participant ID column (default: participant)")
    p.add_argument("--site-col", default="site", help="site/region column (default: site, else region)")
    p.add_argument("--maps", default="", help="comma-separated map columns (default: every non-pathology numeric column)")
    p.add_argument("--pathology", default="", help="comma-separated pathology columns (default: ki67_percent, nsr, fnclcc_grade if present)")
    p.add_argument("--quantile-method", default="linear",
                   help="numpy quantile method for median/IQR (default linear = Hyndman & Fan type 7)")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------- input

def read_cohort_csv(path, participant_col: str = "participant", site_col: str = "site") -> dict:
    """Read the cohort CSV. Returns {"participant": [...], "site": [...], "columns": {name: [float|nan]}}.

    Raises InputDataError naming the file, line and column of the first problem.
    """
    from SmartBiopsyCoreLib.errors import InputDataError

    p = Path(path)
    if p.is_dir():
        raise InputDataError(f"{p} is a folder; give the cohort CSV file.")
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputDataError(f"cohort file {p} does not exist; check the path.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputDataError(f"cohort file {p} is not UTF-8 text; save it from the spreadsheet as CSV UTF-8.") from None
    if not text.strip():
        raise InputDataError(f"cohort file {p} is empty.")
    first = text.splitlines()[0]
    delim = max(",;\t", key=first.count)
    reader = csv.reader(io.StringIO(text), delimiter=delim)
    header = [h.strip() for h in next(reader)]
    lower = [h.lower() for h in header]
    if len(set(lower)) != len(lower):
        dup = sorted({h for h in lower if lower.count(h) > 1})
        raise InputDataError(f"cohort file {p} has duplicate column names ({', '.join(dup)}); rename them.")
    pcol = participant_col.lower()
    if pcol not in lower:
        raise InputDataError(f"cohort file {p} has no '{participant_col}' column (header: {', '.join(header)}); use --participant-col.")
    scol = site_col.lower()
    if scol not in lower:
        if site_col == "site" and "region" in lower:
            scol = "region"
        else:
            raise InputDataError(f"cohort file {p} has no '{site_col}' column (header: {', '.join(header)}); use --site-col.")
    pi, si = lower.index(pcol), lower.index(scol)
    value_idx = [i for i in range(len(header)) if i not in (pi, si) and header[i]]
    if not value_idx:
        raise InputDataError(f"cohort file {p} has no value columns besides participant and site; add map and pathology columns.")
    out = {"participant": [], "site": [], "columns": {header[i]: [] for i in value_idx}}
    seen = {}
    try:
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            line = reader.line_num
            if len(cells) > len(header):
                raise InputDataError(f"cohort file {p} line {line} has {len(cells)} cells for {len(header)} columns; check for stray separators.")
            cells = cells + [""] * (len(header) - len(cells))
            part, site = cells[pi].strip(), cells[si].strip()
            if not part or not site:
                raise InputDataError(f"cohort file {p} line {line} lacks the participant or site; fill both in.")
            if (part, site) in seen:
                raise InputDataError(
                    f"cohort file {p} line {line} repeats participant {part} site {site} (first on line {seen[(part, site)]}); keep one row per site."
                )
            seen[(part, site)] = line
            out["participant"].append(part)
            out["site"].append(site)
            for i in value_idx:
                cell = cells[i].strip()
                if cell == "" or cell.lower() in ("na", "n/a", "nan"):
                    out["columns"][header[i]].append(math.nan)
                    continue
                try:
                    v = float(cell)
                except ValueError:
                    raise InputDataError(
                        f"cohort file {p} line {line} column '{header[i]}' has {cell!r}, not a number; enter numbers only (units belong in the header)."
                    ) from None
                if not math.isfinite(v):
                    raise InputDataError(f"cohort file {p} line {line} column '{header[i]}' is {cell!r}; enter a finite number or leave it blank.")
                out["columns"][header[i]].append(v)
    except csv.Error as exc:
        raise InputDataError(f"cohort file {p} is not a valid CSV ({exc}); export it again.") from None
    if not out["participant"]:
        raise InputDataError(f"cohort file {p} has a header but no site rows.")
    return out


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _select_columns(columns: dict, maps_arg: str, path_arg: str) -> tuple[list[str], list[str]]:
    from SmartBiopsyCoreLib.errors import InputDataError

    names = list(columns)
    by_lower = {n.lower(): n for n in names}

    def resolve(req: list[str], what: str) -> list[str]:
        missing = [r for r in req if r.lower() not in by_lower]
        if missing:
            raise InputDataError(f"{what} column(s) {', '.join(missing)} are not in the cohort file (columns: {', '.join(names)}).")
        return [by_lower[r.lower()] for r in req]

    pathology = resolve(_split(path_arg), "pathology") if path_arg else [n for n in names if n.lower() in DEFAULT_PATHOLOGY]
    maps = resolve(_split(maps_arg), "map") if maps_arg else [n for n in names if n not in pathology]
    overlap = set(maps) & set(pathology)
    if overlap:
        raise InputDataError(f"column(s) {', '.join(sorted(overlap))} are listed both as map and as pathology; choose one.")
    if not maps:
        raise InputDataError("the cohort file has no map columns; add e.g. adc, ff, ef or name them with --maps.")
    return maps, pathology


# ----------------------------------------------------------------------------------------------- analysis

def _try(fn, *a, **k):
    from SmartBiopsyCoreLib.errors import InputDataError

    try:
        return fn(*a, **k).to_dict()
    except InputDataError as exc:
        return {"not_computed": str(exc)}


def analyse_cohort(data: dict, maps: list[str], pathology: list[str], quantile_method: str = "linear") -> tuple:
    """Compute the per-participant summary and the statistics dict (see module docstring)."""
    import numpy as np

    from SmartBiopsyLib.records import stats
    if quantile_method not in stats.QUANTILE_METHODS:
        from SmartBiopsyCoreLib.errors import InputDataError

        raise InputDataError(f"unknown quantile method {quantile_method!r}; use one of {', '.join(stats.QUANTILE_METHODS)}.")
    variables = maps + pathology
    cols = {v: np.asarray(data["columns"][v], dtype=float) for v in variables}
    summary = stats.per_participant_summary(data["participant"], cols)
    out = {
        "n_participants": len(summary.participants),
        "n_sites": len(data["participant"]),
        "maps": maps,
        "pathology": pathology,
        "summary_method": summary.method,
        "descriptive": {},
        "normality": {},
        "correlations": [],
        "roc_high_grade": [],
        "notes": [
            "site-level correlations treat sites as independent although several come from one participant; "
            "participant-level (means, ranges) correlations do not",
        ],
    }
    for v in variables:
        out["descriptive"][v] = {
            "site_values": _try(stats.median_iqr, cols[v], method=quantile_method, omit_missing=True),
            "participant_means": _try(stats.median_iqr, summary.mean[v], method=quantile_method, omit_missing=True),
            "participant_ranges": _try(stats.median_iqr, summary.range[v], method=quantile_method, omit_missing=True),
        }
        out["normality"][v] = _try(stats.shapiro_wilk, cols[v], omit_missing=True)
    for m in maps:
        for pv in pathology:
            out["correlations"].append({
                "map": m, "pathology": pv,
                "site_values": _try(stats.spearman, cols[m], cols[pv], omit_missing=True),
                "participant_means": _try(stats.spearman, summary.mean[m], summary.mean[pv], omit_missing=True),
                "participant_ranges": _try(stats.spearman, summary.range[m], summary.range[pv], omit_missing=True),
            })
    grade = next((g for g in pathology if g.lower() in GRADE_COLUMNS), None)
    if grade is not None:
        g = cols[grade]
        for m in maps:
            ok = ~np.isnan(g) & ~np.isnan(cols[m])
            r = _try(stats.roc_analysis, cols[m][ok], (g[ok] >= 3).astype(int), positive_if="higher")
            if "not_computed" not in r:
                r.pop("fpr"), r.pop("tpr"), r.pop("thresholds")
            out["roc_high_grade"].append({"map": m, "reference": f"{grade} == 3 vs 1-2 (site level)", **r})
    return summary, out


def _fmt(x) -> str:
    """CSV cell: blank for missing, integers as integers, floats with full precision."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return str(x) if isinstance(x, int) else repr(float(x))


def write_outputs(out_dir: Path, summary, stats_dict: dict) -> list[Path]:
    from SmartBiopsyCoreLib.errors import InputDataError

    if out_dir.exists() and not out_dir.is_dir():
        raise InputDataError(f"--out {out_dir} exists and is not a folder; choose a folder path.")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary.rows()
    header = list(rows[0]) if rows else ["participant"]
    csv_path = out_dir / "participant_summary.csv"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([r["participant"]] + [_fmt(r[h]) for h in header[1:]])
    json_path = out_dir / "cohort_stats.json"
    for path, text in ((csv_path, buf.getvalue()), (json_path, json.dumps(stats_dict, indent=1, allow_nan=False))):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return [csv_path, json_path]


def run(args) -> int:
    data = read_cohort_csv(args.csv, args.participant_col, args.site_col)
    maps, pathology = _select_columns(data["columns"], args.maps, args.pathology)
    summary, result = analyse_cohort(data, maps, pathology, args.quantile_method)
    result["input"] = str(args.csv)
    paths = write_outputs(Path(args.out), summary, result)
    logger.info("cohort: %d participants, %d sites -> %s", result["n_participants"], result["n_sites"], args.out)
    print(jsonio.dumps({"participants": result["n_participants"], "sites": result["n_sites"], "maps": maps,
                      "pathology": pathology, "files": [str(p) for p in paths]}), file=sys.stdout)
    return 0

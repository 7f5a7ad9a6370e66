"""HTML building blocks of the report: inline CSS, escaping, number formatting, tables, 'not available' notes."""

from __future__ import annotations

import html

import numpy as np


#: The ``<meta>`` tags of the report's ``<head>``: UTF-8 and a viewport as wide as the device (a phone or a
#: narrow window shows the report at its own width instead of zooming out a desktop-wide page).
HEAD_META = '<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'

#: Responsive layout: readable from 800 px up (base text 16 px, nothing below 14 px), pictures never wider than
#: the page, wide tables scroll inside their own box (``.table-scroll``) instead of the page; no fixed width.
REPORT_CSS = """
*,*::before,*::after{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{font-family:Helvetica,Arial,sans-serif;font-size:16px;margin:24px auto;padding:0 16px;max-width:1180px;
color:#222;line-height:1.45;overflow-wrap:break-word}
h1{border-bottom:3px solid #2a5d8f;padding-bottom:6px;font-size:1.7em}
h2{color:#2a5d8f;border-bottom:1px solid #ccc;margin-top:34px}
.table-scroll{max-width:100%;overflow-x:auto;margin:10px 0}
table{border-collapse:collapse;margin:0;font-size:14px}th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}
th{background:#eef3f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.na{background:#fff4e5;border-left:4px solid #e69500;padding:6px 10px;color:#6b4500}
.pass{color:#137333;font-weight:bold}.fail{color:#b3261e;font-weight:bold}
.note{color:#555;font-size:14px}figure{margin:12px 0;max-width:100%}
figure img,img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-size:14px;color:#444}
"""


def esc(x, quote: bool = False) -> str:
    """HTML text (``quote=True`` for attribute values); text keeps quotes readable in the source."""
    return html.escape("" if x is None else str(x), quote=quote)


def fmt_num(v, nd: int = 1) -> str:
    if v is None or v == "":
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not np.isfinite(f):
        return "-"
    return f"{f:.{nd}f}"


def html_table(header, rows, num_cols=()) -> str:
    h = "".join(f"<th>{esc(c)}</th>" for c in header)
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = ' class="num"' if i in num_cols else ""
            cells.append(f"<td{cls}>{c if isinstance(c, RawHtml) else esc(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="table-scroll"><table><tr>{h}</tr>{"".join(body)}</table></div>'


class RawHtml(str):
    """Already-escaped HTML for a table cell."""


def na_note(text: str) -> str:
    return f'<p class="na">{esc(text)}</p>'

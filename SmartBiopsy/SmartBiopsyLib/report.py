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
Sections are matched to workflow stages by the keywords in :data:`SECTION_STAGE_KEYWORDS`.
"""
from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from RegistrationFusionLib.landmarks import apply_transform

logger = logging.getLogger(__name__)

#: Section headings, in order (tests look for them).
SECTION_TITLES = (
    "1 Case and procedure summary",
    "2 Fusion QA",
    "3 Habitat map and targets",
    "4 Trajectories on CT",
    "5 Notch ROIs and values",
    "6 Specimens",
    "7 Procedure summary",
    "8 Heterogeneity",
)

#: Which workflow stage produces each kind of artefact: a stage matches when its name (lower case)
#: contains one of the keywords.
SECTION_STAGE_KEYWORDS = {
    "inputs": ("load", "input", "phantom"),
    "fusion": ("regist", "fus"),
    "characterisation": ("character", "habitat", "map", "target"),
    "plan": ("plan", "trajector"),
    "robot": ("robot", "guid", "session"),
    "sampling": ("sampl", "needle", "notch", "confirm"),
    "specimens": ("specimen", "record", "patholog"),
}

#: Habitat colours: 1 A red, 2 B yellow, 3 C blue (as the habitat segmentation in the scene).
HABITAT_COLOURS = {1: (0.90, 0.10, 0.10), 2: (0.98, 0.85, 0.10), 3: (0.15, 0.35, 0.95)}
REGION_COLOURS = {"A": HABITAT_COLOURS[1], "B": HABITAT_COLOURS[2], "C": HABITAT_COLOURS[3]}
MAP_UNITS = {"adc": "10^-6 mm^2/s", "ff": "%", "ef": "%"}
MAP_CMAPS = {"adc": "viridis", "ff": "magma", "ef": "inferno"}
CT_WINDOW_HU = (-200.0, 300.0)

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;line-height:1.4}
h1{border-bottom:3px solid #2a5d8f;padding-bottom:6px}h2{color:#2a5d8f;border-bottom:1px solid #ccc;margin-top:34px}
table{border-collapse:collapse;margin:10px 0;font-size:13px}th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}
th{background:#eef3f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.na{background:#fff4e5;border-left:4px solid #e69500;padding:6px 10px;color:#6b4500}
.pass{color:#137333;font-weight:bold}.fail{color:#b3261e;font-weight:bold}
.note{color:#555;font-size:13px}figure{margin:12px 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:13px;color:#444}
"""


# ------------------------------------------------------------------------------------------------
# figure checks (used by the tests and the e2e demo)
# ------------------------------------------------------------------------------------------------
def figure_checks(path, min_width: int = 200, min_height: int = 150, min_std: float = 0.02,
                  min_colours: int = 16) -> dict:
    """Check that ``path`` is a real picture: decodes as PNG, at least ``min_width`` x ``min_height`` pixels,
    pixel standard deviation (RGB in 0-1) above ``min_std`` and more than ``min_colours`` distinct colours.

    Returns {"ok", "decodes", "width", "height", "std", "colours", "reasons"}.
    """
    from matplotlib import image as mpimg

    out = {"ok": False, "decodes": False, "width": 0, "height": 0, "std": 0.0, "colours": 0, "reasons": []}
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                out["reasons"].append("not a PNG file")
                return out
        img = mpimg.imread(os.fspath(path), format="png")
    except Exception as exc:  # noqa: BLE001 - any decoding problem is a failed check
        out["reasons"].append(f"does not decode: {exc}")
        return out
    out["decodes"] = True
    img = np.asarray(img, dtype=float)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.max() > 1.0:
        img = img / 255.0
    rgb = img[..., :3]
    out["height"], out["width"] = int(rgb.shape[0]), int(rgb.shape[1])
    out["std"] = float(rgb.std())
    q = np.round(rgb * 255).astype(np.uint32)
    out["colours"] = int(np.unique((q[..., 0] << 16) | (q[..., 1] << 8) | q[..., 2]).size)
    if out["width"] < min_width or out["height"] < min_height:
        out["reasons"].append(f"too small ({out['width']} x {out['height']})")
    if out["std"] <= min_std:
        out["reasons"].append(f"nearly uniform (pixel SD {out['std']:.3f})")
    if out["colours"] <= min_colours:
        out["reasons"].append(f"only {out['colours']} distinct colours")
    out["ok"] = not out["reasons"]
    return out


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _esc(x, quote: bool = False) -> str:
    """HTML text (``quote=True`` for attribute values); text keeps quotes readable in the source."""
    return html.escape("" if x is None else str(x), quote=quote)


def _fmt(v, nd: int = 1) -> str:
    if v is None or v == "":
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not np.isfinite(f):
        return "-"
    return f"{f:.{nd}f}"


def _table(header, rows, num_cols=()) -> str:
    h = "".join(f"<th>{_esc(c)}</th>" for c in header)
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = ' class="num"' if i in num_cols else ""
            cells.append(f"<td{cls}>{c if isinstance(c, _Raw) else _esc(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float).reshape(3)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def _perp_axial(d) -> np.ndarray:
    """Unit vector perpendicular to ``d`` and as close to the axial plane as possible."""
    w = np.cross(d, [0.0, 0.0, 1.0])
    if np.linalg.norm(w) < 1e-6:
        w = np.cross(d, [0.0, 1.0, 0.0])
    return _unit(w)


def _apply(m, pts) -> np.ndarray:
    """(N, 3) points through a 4x4 matrix; a single point comes back as a (1, 3) array."""
    return apply_transform(m, np.atleast_2d(np.asarray(pts, float)))


def reslice(volume, centre_ras, u, v, half_u_mm: float, half_v_mm: float, step_mm: float = 0.5, order: int = 1,
            world_to_volume=None) -> np.ndarray:
    """Sample ``volume`` (a RasVolume) on a plane: rows along ``v``, columns along ``u`` (unit RAS vectors).

    Pixel (r, c) is at ``centre + (c*step - half_u) u + (r*step - half_v) v`` (mm, in the plane's world);
    ``world_to_volume`` (4x4 RAS, optional) takes that world into the volume's world. Vectorised with
    ``scipy.ndimage.map_coordinates``; outside the volume is NaN. Returns float32 (rows, cols).
    """
    from scipy import ndimage

    nu = int(round(2 * half_u_mm / step_mm)) + 1
    nv = int(round(2 * half_v_mm / step_mm)) + 1
    cu = np.linspace(-half_u_mm, half_u_mm, nu)
    cv = np.linspace(-half_v_mm, half_v_mm, nv)
    pts = (np.asarray(centre_ras, float)[None, None, :] + cu[None, :, None] * np.asarray(u, float)
           + cv[:, None, None] * np.asarray(v, float)).reshape(-1, 3)
    if world_to_volume is not None:
        pts = _apply(world_to_volume, pts)
    ijk = volume.ras_to_ijk_points(pts)
    kji = ijk[:, ::-1].T
    shape = np.array(volume.array.shape)
    lo = np.clip(np.floor(kji.min(axis=1)).astype(int) - 1, 0, shape)
    hi = np.clip(np.ceil(kji.max(axis=1)).astype(int) + 2, 0, shape)
    if np.any(hi <= lo):
        return np.full((nv, nu), np.nan, np.float32)
    sub = np.asarray(volume.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], np.float32)
    out = ndimage.map_coordinates(sub, kji - lo[:, None], order=order, mode="constant", cval=np.nan,
                                  prefilter=False)
    return out.reshape(nv, nu).astype(np.float32)


def _window(a, lo_pct=1.0, hi_pct=99.0):
    f = a[np.isfinite(a)]
    if f.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(f, [lo_pct, hi_pct])
    return float(lo), float(hi if hi > lo else lo + 1.0)


# ------------------------------------------------------------------------------------------------
# the case folder
# ------------------------------------------------------------------------------------------------
class _Case:
    """Lazy, tolerant access to a case output folder; remembers why an artefact could not be read."""

    def __init__(self, out_dir: Path):
        self.root = Path(out_dir)
        self.problems: dict[str, str] = {}
        self._cache: dict = {}
        self.summary = self.json("summary.json") or {}
        stages = self.summary.get("stages") if isinstance(self.summary, dict) else None
        self.stages = [s for s in (stages or []) if isinstance(s, dict)]

    # readers ----------------------------------------------------------------------------------
    def json(self, rel):
        key = ("json", rel)
        if key not in self._cache:
            p = self.root / rel
            data = None
            if p.is_file():
                try:
                    data = json.loads(p.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    self.problems[rel] = f"{rel} could not be read ({exc})"
            self._cache[key] = data
        return self._cache[key]

    def csv(self, rel):
        key = ("csv", rel)
        if key not in self._cache:
            p = self.root / rel
            rows = None
            if p.is_file():
                try:
                    with p.open(newline="", encoding="utf-8-sig") as fh:
                        rows = list(csv.DictReader(fh))
                except (OSError, csv.Error, UnicodeDecodeError) as exc:
                    self.problems[rel] = f"{rel} could not be read ({exc})"
            self._cache[key] = rows
        return self._cache[key]

    def volume(self, rel):
        key = ("vol", rel)
        if key not in self._cache:
            p = self.root / rel
            vol = None
            if p.is_file():
                try:
                    from .imageio import load_image

                    vol = load_image(p)
                except Exception as exc:  # noqa: BLE001 - report, never fail
                    self.problems[rel] = f"{rel} could not be read ({exc})"
            self._cache[key] = vol
        return self._cache[key]

    # stages -----------------------------------------------------------------------------------
    def stage_for(self, kind: str):
        keys = SECTION_STAGE_KEYWORDS.get(kind, (kind,))
        for s in self.stages:
            name = str(s.get("name", "")).lower()
            if any(k in name for k in keys):
                return s
        return None

    def first_failed(self):
        return next((s for s in self.stages if s.get("status") == "failed"), None)

    def why(self, kind: str, rel: str) -> str:
        """The 'not available (...)' sentence for artefact ``rel`` produced by stage kind ``kind``."""
        if rel in self.problems:
            return f"not available ({self.problems[rel]})"
        st = self.stage_for(kind)
        failed = self.first_failed()
        if st is None:
            if failed is not None:
                return (f"not available (step {failed.get('name')} did not finish: {failed.get('message') or 'failed'}"
                        f"; {rel} was not produced)")
            return f"not available ({rel} was not produced)"
        name, status, msg = st.get("name"), st.get("status"), (st.get("message") or "").strip()
        if status == "done":
            return f"not available (step {name} finished but {rel} is missing)"
        if status == "skipped" and not msg and failed is not None:
            msg = f"skipped because step {failed.get('name')} failed: {failed.get('message') or 'failed'}"
        return f"not available (step {name} did not finish: {msg or status or 'not run'})"

    # derived ----------------------------------------------------------------------------------
    def mri_to_ct(self):
        fusion = self.json("registration/fusion.json")
        if isinstance(fusion, dict) and fusion.get("matrix_mri_to_ct_ras") is not None:
            m = np.asarray(fusion["matrix_mri_to_ct_ras"], float)
            if m.shape == (4, 4) and np.all(np.isfinite(m)):
                return m
        return None

    def targets(self) -> list:
        t = self.json("characterisation/targets.json")
        if isinstance(t, dict) and isinstance(t.get("targets"), list):
            return [x for x in t["targets"] if isinstance(x, dict)]
        return []

    def target_mri(self, t):
        """A target's MRI-world point: ``point_ras``, else ``point_ct_ras`` taken back through the fusion."""
        if t.get("point_ras") is not None:
            return np.asarray(t["point_ras"], float)
        m = self.mri_to_ct()
        if m is not None and t.get("point_ct_ras") is not None:
            return _apply(np.linalg.inv(m), t["point_ct_ras"])[0]
        return None

    def target_ct(self, t):
        if t.get("point_ct_ras") is not None:
            return np.asarray(t["point_ct_ras"], float)
        m = self.mri_to_ct()
        if m is not None and t.get("point_ras") is not None:
            return _apply(m, t["point_ras"])[0]
        return None

    def sampling_dirs(self) -> list[Path]:
        d = self.root / "sampling"
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.is_dir())


# ------------------------------------------------------------------------------------------------
# figure plumbing
# ------------------------------------------------------------------------------------------------
class _Figures:
    def __init__(self, fig_dir: Path):
        self.dir = fig_dir
        self.paths: list[str] = []

    @staticmethod
    def new(w, h, dpi=100):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(w, h), dpi=dpi)
        FigureCanvasAgg(fig)
        return fig

    def save(self, fig, name: str, caption: str) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name}.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        data = buf.getvalue()
        path.write_bytes(data)
        self.paths.append(str(path))
        return self.embed(data, name, caption)

    def embed_file(self, path, name: str, caption: str) -> str:
        data = Path(path).read_bytes()
        target = self.dir / f"{name}.png"
        self.dir.mkdir(parents=True, exist_ok=True)
        if Path(path).resolve() != target.resolve():
            target.write_bytes(data)
        self.paths.append(str(target))
        return self.embed(data, name, caption)

    @staticmethod
    def embed(data: bytes, name: str, caption: str) -> str:
        b64 = base64.b64encode(data).decode("ascii")
        return (f'<figure id="fig-{_esc(name, True)}"><img alt="{_esc(caption, True)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _na(text: str) -> str:
    return f'<p class="na">{_esc(text)}</p>'


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------
def _section_summary(case: _Case, figs: _Figures) -> str:
    out = []
    s = case.summary if isinstance(case.summary, dict) else {}
    if not s:
        out.append(_na(f"not available ({case.problems.get('summary.json', 'summary.json was not written')})"))
    c = s.get("case") or {}
    rows = [("case", c.get("name", "-")), ("source", c.get("source", "-")),
            ("synthetic data", "yes (phantom)" if c.get("synthetic") else "no")]
    if s.get("peak_memory_mb") is not None:
        rows.append(("peak memory", f"{_fmt(s.get('peak_memory_mb'), 0)} MB"))
    total = sum(float(x.get("seconds") or 0.0) for x in case.stages)
    rows.append(("total time of the steps", f"{total:.1f} s"))
    proc = case.json("specimens/procedure.json")
    if isinstance(proc, dict):
        rows.append(("total DLP", f"{_fmt(proc.get('total_dlp_mgy_cm'))} mGy*cm"))
        el, win = proc.get("elapsed_min"), proc.get("window_min", 60.0)
        verdict = ("-" if el is None else (f"{_fmt(el)} min of the {_fmt(win, 0)} min window "
                                           + ("(EXCEEDED)" if proc.get("window_exceeded") else "(within)")))
        rows.append(("procedure time", verdict))
    else:
        rows.append(("DLP and procedure window", case.why("specimens", "specimens/procedure.json")))
    out.append(_table(("item", "value"), rows))
    if case.stages:
        srows = []
        for st in case.stages:
            status = st.get("status", "")
            cls = {"done": "pass", "failed": "fail"}.get(status, "note")
            srows.append((st.get("name", ""), _Raw(f'<span class="{cls}">{_esc(status)}</span>'),
                          _fmt(st.get("seconds"), 2), st.get("message", "")))
        out.append(_table(("step", "status", "seconds", "message"), srows, num_cols=(2,)))
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


def _fusion_point(case: _Case, ct):
    pts = [p for p in (case.target_ct(t) for t in case.targets()) if p is not None]
    if pts:
        return np.mean(pts, axis=0), "the targets' centre"
    tum = case.volume("characterisation/tumour.nrrd")
    m = case.mri_to_ct()
    if tum is not None and m is not None and np.any(tum.array):
        c = tum.kji_to_ras_points(np.argwhere(tum.array != 0).mean(axis=0)[None])[0]
        return _apply(m, c)[0], "the tumour centre"
    lo, hi = ct.bounds_ras()
    return 0.5 * (lo + hi), "the CT centre (no tumour or targets available)"


def _section_fusion(case: _Case, figs: _Figures) -> str:
    out = []
    fusion = case.json("registration/fusion.json")
    qa_doc = case.json("registration/qa.json")
    qa_d = (fusion or {}).get("qa") if isinstance(fusion, dict) else None
    qa_d = qa_d or (qa_doc if isinstance(qa_doc, dict) else None)
    # pictures
    ct = case.volume("inputs/ct.nrrd")
    mr_on_ct = case.volume("registration/t2_on_ct.nrrd")
    if mr_on_ct is None and ct is not None and case.mri_to_ct() is not None:
        t2 = case.volume("inputs/mri_t2.nrrd")
        if t2 is not None:
            from RegistrationFusionLib.geometry import resample

            mr_on_ct = resample(t2, ct, case.mri_to_ct())
    if ct is None:
        out.append(_na("Fused pictures " + case.why("inputs", "inputs/ct.nrrd")))
    elif mr_on_ct is None:
        out.append(_na("Fused pictures " + case.why("fusion", "registration/t2_on_ct.nrrd")))
    elif not mr_on_ct.same_grid(ct):
        out.append(_na("Fused pictures not available (registration/t2_on_ct.nrrd is not on the CT grid)"))
    else:
        from RegistrationFusionLib.qa import write_fusion_pictures

        point, what = _fusion_point(case, ct)
        try:
            paths = write_fusion_pictures(ct, mr_on_ct, point, figs.dir, prefix="fusion")
        except Exception:  # noqa: BLE001 - a point outside the CT: use its centre
            lo, hi = ct.bounds_ras()
            point, what = 0.5 * (lo + hi), "the CT centre"
            paths = write_fusion_pictures(ct, mr_on_ct, point, figs.dir, prefix="fusion")
        out.append(figs.embed_file(paths["checkerboard"], "fusion_checkerboard",
                                   f"Checkerboard of the MRI resampled on the CT and the CT through {what} "
                                   f"(R {point[0]:.1f}, A {point[1]:.1f}, S {point[2]:.1f} mm): edges must continue "
                                   "across the squares."))
        out.append(figs.embed_file(paths["overlay"], "fusion_overlay",
                                   "MRI (hot colours) over the CT (grey) through the same point."))
    if not isinstance(qa_d, dict):
        out.append(_na("Registration QA " + case.why("fusion", "registration/fusion.json")))
        return "\n".join(out)
    passed = bool(qa_d.get("passed"))
    out.append(f'<p>Registration QA: <span class="{"pass" if passed else "fail"}">'
               f'{"PASSED" if passed else "FAILED"}</span>; FRE {_fmt(qa_d.get("fre_mm"), 2)} mm.</p>')
    for f in qa_d.get("failures") or []:
        out.append(f'<p class="fail">{_esc(f)}</p>')
    markers = [m for m in (qa_d.get("markers") or []) if isinstance(m, dict)]
    th = qa_d.get("thresholds") or {}
    if markers:
        labels = [str(m.get("label", m.get("pair_index", i))) for i, m in enumerate(markers)]
        res = np.array([np.nan if m.get("residual_mm") is None else float(m["residual_mm"]) for m in markers])
        exp = np.array([np.nan if m.get("expected_residual_mm") is None else float(m["expected_residual_mm"])
                        for m in markers])
        used = [bool(m.get("used", True)) for m in markers]
        fig = figs.new(max(6.0, 0.5 * len(markers) + 3), 3.8)
        ax = fig.add_subplot(111)
        x = np.arange(len(markers))
        ax.bar(x, np.nan_to_num(res), color=["#3b7dd8" if u else "#9aa0a6" for u in used],
               label="residual (grey: excluded)")
        if np.isfinite(exp).any():
            ax.scatter(x, exp, marker="_", s=300, color="k", label="expected from FLE", zorder=3)
        fre = qa_d.get("fre_mm")
        if fre is not None:
            ax.axhline(float(fre), color="#d93025", ls="--", label=f"FRE {float(fre):.2f} mm")
        if th.get("max_fre_mm") is not None:
            ax.axhline(float(th["max_fre_mm"]), color="#e69500", ls=":", label=f"FRE limit {th['max_fre_mm']} mm")
        ax.set_xticks(x, labels, rotation=45 if len(markers) > 8 else 0)
        ax.set_xlabel("capsule marker")
        ax.set_ylabel("residual after registration (mm)")
        ax.set_title("per-marker residuals")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        out.append(figs.save(fig, "fusion_residuals", "Residual of each capsule pair after the registration, "
                                                        "with the fiducial registration error (FRE)."))
        rows = [(lab, "yes" if u else "no", _fmt(m.get("residual_mm"), 2), _fmt(m.get("expected_residual_mm"), 2),
                 _fmt(m.get("loo_mm"), 2)) for lab, u, m in zip(labels, used, markers)]
        out.append(_table(("marker", "used", "residual (mm)", "expected (mm)", "leave-one-out (mm)"), rows,
                          num_cols=(2, 3, 4)))
    else:
        out.append(_na("per-marker residuals not available (the QA report lists no markers)"))
    tgts = [t for t in (qa_d.get("targets") or []) if isinstance(t, dict)]
    if tgts:
        rows = [(t.get("name"), _fmt(t.get("predicted_tre_mm"), 2), _fmt(t.get("predicted_tre_fwm_mm"), 2),
                 _fmt(t.get("refinement_displacement_mm"), 2),
                 " ".join(_fmt(v) for v in (t.get("ras") or []))) for t in tgts]
        out.append("<p>Predicted target registration error at each target:</p>")
        out.append(_table(("target", "predicted TRE (mm)", "TRE, FLE-weighted (mm)", "moved by refinement (mm)",
                           "CT RAS (mm)"), rows, num_cols=(1, 2, 3)))
    else:
        out.append(_na("predicted TRE at the targets not available (the QA was computed without targets)"))
    notes = qa_d.get("notes") or []
    if notes:
        out.append('<p class="note">' + "<br>".join(_esc(n) for n in notes if n) + "</p>")
    return "\n".join(out)


def _mean_sd(st) -> str:
    return f"{_fmt(st.get('mean'))} ± {_fmt(st.get('sd'))}" if isinstance(st, dict) and st else "-"


def _habitat_rgba(lab: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    rgba = np.zeros(lab.shape + (4,), float)
    for code, col in HABITAT_COLOURS.items():
        sel = lab == code
        rgba[sel, :3] = col
        rgba[sel, 3] = alpha
    return rgba


def _section_habitats(case: _Case, figs: _Figures) -> str:
    out = []
    hab = case.volume("characterisation/habitats.nrrd")
    t2 = case.volume("inputs/mri_t2.nrrd")
    targets = case.targets()
    if hab is None:
        out.append(_na("Habitat map " + case.why("characterisation", "characterisation/habitats.nrrd")))
    else:
        base = t2 if t2 is not None else case.volume("characterisation/adc.nrrd")
        base_name = "T2" if t2 is not None else "ADC"
        pts = [(t.get("name", f"T{i + 1}"), t.get("region", ""), case.target_mri(t)) for i, t in enumerate(targets)]
        pts = [p for p in pts if p[2] is not None]
        if not pts:  # no targets: the slice through the habitat map's centre of mass
            c = hab.kji_to_ras_points(np.argwhere(hab.array > 0).mean(axis=0)[None])[0] if np.any(hab.array > 0) \
                else np.mean(hab.bounds_ras(), axis=0)
            pts = [("tumour centre", "", c)]
        half = 45.0
        nz = np.argwhere(hab.array > 0)
        if nz.size:
            ext = hab.kji_to_ras_points(nz)
            half = float(np.clip(np.max(np.abs(ext - ext.mean(axis=0))[:, :2]) + 25.0, 30.0, 120.0))
        fig = figs.new(4.2 * len(pts), 4.6)
        u, v = np.array([-1.0, 0, 0]), np.array([0, -1.0, 0])  # radiological: patient right on the left, anterior up
        for i, (name, region, p) in enumerate(pts):
            ax = fig.add_subplot(1, len(pts), i + 1)
            centre = p.copy()
            lab = reslice(hab, centre, u, v, half, half, 0.5, order=0)
            if base is not None:
                img = reslice(base, centre, u, v, half, half, 0.5, order=1)
                lo, hi = _window(img)
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=(-half, half, half, -half))
            ax.imshow(_habitat_rgba(np.nan_to_num(lab).astype(int)), extent=(-half, half, half, -half))
            for other_name, other_region, q in pts:
                d = q - centre
                if abs(d[2]) <= 2.5:  # targets within this slab
                    ax.plot([-d[0]], [-d[1]], marker="+", ms=16, mew=2.5, color="white")
                    ax.plot([-d[0]], [-d[1]], marker="+", ms=13, mew=1.2,
                            color=REGION_COLOURS.get(other_region, (0, 1, 0)))
                    ax.annotate(other_name, (-d[0], -d[1]), xytext=(6, 6), textcoords="offset points", color="white",
                                fontsize=9, fontweight="bold")
            ax.set_title(f"{name}: axial S {p[2]:.1f} mm", fontsize=10)
            ax.set_xlabel("mm (patient right on the left)")
            ax.set_xlim(-half, half)
            ax.set_ylim(half, -half)
        fig.suptitle(f"Habitats on {base_name}: A red (low ADC, high EF), B yellow (discordant), "
                     "C blue (high ADC, low EF)", fontsize=10)
        fig.tight_layout()
        out.append(figs.save(fig, "habitats_targets",
                             f"Habitat map over the {base_name} (MRI world), axial slice through each proposed "
                             "target (+)."))
    regions = case.csv("characterisation/regions.csv")
    if regions:
        rows = []
        for r in regions:
            ms = lambda k: f"{_fmt(r.get(k + '_mean'))} ± {_fmt(r.get(k + '_sd'))}"  # noqa: E731
            rows.append((r.get("region"), _fmt(r.get("volume_ml"), 2), r.get("voxel_count", "-"), ms("adc"), ms("ef"),
                         ms("ff")))
        out.append(_table(("region", "volume (ml)", "voxels", "ADC mean ± SD (10^-6 mm^2/s)", "EF mean ± SD (%)",
                           "FF mean ± SD (%)"), rows, num_cols=(1, 2)))
    else:
        out.append(_na("Region table " + case.why("characterisation", "characterisation/regions.csv")))
    chars = case.json("characterisation/characterisation.json")
    missing = ((chars or {}).get("habitats") or {}).get("missing") if isinstance(chars, dict) else None
    for m in (missing or {}).values():
        out.append(f'<p class="note">{_esc(m)}</p>')
    if targets:
        rows = []
        for t in targets:
            sig = t.get("signature") or {}
            sv = lambda k: _mean_sd(sig.get(k))  # noqa: E731
            ctp = case.target_ct(t)
            mrp = case.target_mri(t)
            rows.append((t.get("name"), t.get("region"), "-" if mrp is None else " ".join(_fmt(v) for v in mrp),
                         "-" if ctp is None else " ".join(_fmt(v) for v in ctp), _fmt(t.get("depth_mm")),
                         "yes" if t.get("targetable", True) else "NO: " + "; ".join(t.get("reasons") or []),
                         sv("adc"), sv("ef"), sv("ff")))
        out.append(_table(("target", "region", "MRI RAS (mm)", "CT RAS (mm)", "depth (mm)", "targetable",
                           "ADC", "EF (%)", "FF (%)"), rows, num_cols=(4,)))
    elif hab is not None:
        out.append(_na("Targets " + case.why("characterisation", "characterisation/targets.json")))
    return "\n".join(out)


def _chosen_trajectories(plan: dict) -> tuple[list, str]:
    """The best-ranked path per target (what the workflow sends to the robot and samples)."""
    trajs = [t for t in plan.get("trajectories") or [] if isinstance(t, dict)]
    best: dict = {}
    for t in trajs:
        key = t.get("target", t.get("name"))
        if key not in best or int(t.get("rank", 1)) < int(best[key].get("rank", 1)):
            best[key] = t
    if best:
        return [best[k] for k in sorted(best, key=str)], "best-ranked path per target"
    shared = plan.get("shared_entry")
    if isinstance(shared, dict) and shared.get("trajectories"):
        return list(shared["trajectories"]), "shared skin entry"
    return [], ""


def _skin_points(case: _Case, ct, centre=None, radius_mm: float | None = None,
                 max_points: int = 4000) -> np.ndarray | None:
    """Skin surface points (RAS, CT world) within the cube ``centre`` +- ``radius_mm``, subsampled."""
    pts = _all_skin_points(case, ct)
    if pts is None:
        return None
    if centre is not None and radius_mm is not None:
        pts = pts[np.all(np.abs(pts - np.asarray(centre, float)) <= radius_mm, axis=1)]
    if len(pts) > max_points:
        pts = pts[np.random.default_rng(0).choice(len(pts), max_points, replace=False)]
    return pts


def _all_skin_points(case: _Case, ct) -> np.ndarray | None:
    vtp = case.root / "plan" / "skin_model.vtp"
    if vtp.is_file():
        try:
            import vtk
            from vtk.util.numpy_support import vtk_to_numpy

            r = vtk.vtkXMLPolyDataReader()
            r.SetFileName(str(vtp))
            r.Update()
            pts = r.GetOutput().GetPoints()
            if pts is not None and pts.GetNumberOfPoints():
                return vtk_to_numpy(pts.GetData()).astype(float)
        except Exception as exc:  # noqa: BLE001 - fall back to the CT
            logger.info("skin model %s unreadable (%s); using the CT body outline", vtp, exc)
    if ct is None:
        return None
    from scipy import ndimage

    stride = np.maximum(1, np.round(4.0 / ct.spacing[::-1]).astype(int))
    a = np.asarray(ct.array[::stride[0], ::stride[1], ::stride[2]])
    body = a > -300
    lab, n = ndimage.label(body)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = ndimage.binary_fill_holes(lab == np.argmax(sizes))
    surf = body & ~ndimage.binary_erosion(body, border_value=1)  # the CT's end slices are not skin
    return ct.kji_to_ras_points(np.argwhere(surf) * stride)


def _tumour_points_ct(case: _Case, max_points: int = 2500):
    """(points CT RAS, habitat code per point) of the tumour, or (None, None)."""
    m = case.mri_to_ct()
    hab = case.volume("characterisation/habitats.nrrd")
    tum = case.volume("characterisation/tumour.nrrd")
    vol = tum if tum is not None else hab
    if vol is None or m is None or not np.any(vol.array):
        return None, None
    idx = np.argwhere(vol.array != 0)
    if len(idx) > max_points:
        idx = idx[np.random.default_rng(1).choice(len(idx), max_points, replace=False)]
    codes = np.zeros(len(idx), int)
    if hab is not None and hab.array.shape == vol.array.shape:
        codes = np.asarray(hab.array)[tuple(idx.T)].astype(int)
    return _apply(m, vol.kji_to_ras_points(idx)), codes


def _section_trajectories(case: _Case, figs: _Figures) -> str:
    out = []
    plan = case.json("plan/plan.json")
    if not isinstance(plan, dict):
        return _na("Trajectories " + case.why("plan", "plan/plan.json"))
    trajs, which = _chosen_trajectories(plan)
    ct = case.volume("inputs/ct.nrrd")
    for name, msg in (plan.get("failures") or {}).items():
        out.append(f'<p class="fail">{_esc(name)}: {_esc(msg)}</p>')
    if not trajs:
        out.append(_na("no trajectory in plan/plan.json (no safe path was found)"))
        return "\n".join(out)
    if ct is None:
        out.append(_na("Reslices along the paths " + case.why("inputs", "inputs/ct.nrrd")))
    else:
        n = len(trajs)
        fig = figs.new(5.0 * n, 4.8)
        for i, t in enumerate(trajs):
            e = np.asarray(t["entry_ras"], float)
            g = np.asarray(t["target_ras"], float)
            tip = np.asarray(t["tip_ras"], float) if t.get("tip_ras") is not None else g
            d = _unit(g - e)
            w = _perp_axial(d)
            L = float(np.linalg.norm(g - e))
            centre = 0.5 * (e + g)
            hu, hv = L / 2 + 25.0, max(35.0, 0.35 * L)
            img = reslice(ct, centre, d, w, hu, hv, 0.5, order=1)
            ax = fig.add_subplot(1, n, i + 1)
            ax.imshow(img, cmap="gray", vmin=CT_WINDOW_HU[0], vmax=CT_WINDOW_HU[1], extent=(-hu, hu, hv, -hv))
            pe, pg, pt = ((p - centre) @ d for p in (e, g, tip))
            ax.plot([pe, pt], [0, (tip - centre) @ w], color="#00e5ff", lw=1.6, label="planned needle")
            ax.plot([pe], [0], "o", color="#00e5ff", ms=6, label="skin entry")
            ax.plot([pg], [0], "x", color=REGION_COLOURS.get(str(t.get("region")), (1, 0, 1)), ms=11, mew=2.5,
                    label="target")
            clear = t.get("clearance_mm") or {}
            worst = min(clear.items(), key=lambda kv: kv[1]) if clear else None
            ax.set_title(f"{t.get('name', t.get('target'))}: {_fmt(t.get('length_mm'))} mm, "
                         f"{_fmt(t.get('angle_to_axial_deg'))} deg to axial"
                         + (f"\nclosest: {worst[0]} {worst[1]:.1f} mm" if worst else ""), fontsize=9)
            ax.set_xlabel("mm along the needle")
            ax.set_ylabel("mm across (in the plane nearest axial)")
            ax.legend(fontsize=7, loc="lower right")
        fig.suptitle(f"CT resliced on the plane containing each needle path ({which})", fontsize=10)
        fig.tight_layout()
        out.append(figs.save(fig, "trajectories_reslice",
                             "Oblique CT reslice containing each planned path (entry o, target x), CT window "
                             f"{CT_WINDOW_HU[0]:.0f} to {CT_WINDOW_HU[1]:.0f} HU."))
    # 3-D view
    tpts, codes = _tumour_points_ct(case)
    fig = figs.new(7.5, 6.5)
    import mpl_toolkits.mplot3d  # noqa: F401 - registers the 3d projection

    ax = fig.add_subplot(111, projection="3d")
    focus = [np.array([np.asarray(t["entry_ras"], float), np.asarray(t.get("tip_ras") or t["target_ras"], float)])
             for t in trajs]
    if tpts is not None:
        focus.append(tpts)
    f = np.concatenate(focus)
    c = 0.5 * (f.min(axis=0) + f.max(axis=0))
    r = 0.5 * float(np.max(f.max(axis=0) - f.min(axis=0))) + 40.0  # the paths and the tumour with 40 mm around
    skin = _skin_points(case, ct, c, r)
    if skin is not None and len(skin):
        ax.scatter(skin[:, 0], skin[:, 1], skin[:, 2], s=2, c="#8b5a2b", alpha=0.5, label="skin")
    if tpts is not None:
        cols = np.array([HABITAT_COLOURS.get(int(k), (0.5, 0.5, 0.5)) for k in codes])
        ax.scatter(tpts[:, 0], tpts[:, 1], tpts[:, 2], s=4, c=cols, alpha=0.6, label="tumour (habitat colours)")
    for t in trajs:
        e = np.asarray(t["entry_ras"], float)
        tip = np.asarray(t.get("tip_ras") or t["target_ras"], float)
        col = REGION_COLOURS.get(str(t.get("region")), (0.2, 0.2, 0.2))
        ax.plot([e[0], tip[0]], [e[1], tip[1]], [e[2], tip[2]], color=col, lw=2.5)
        ax.scatter([e[0]], [e[1]], [e[2]], color="k", s=20)
        ax.text(*tip, f" {t.get('target', t.get('name'))}", fontsize=8)
    ax.set_xlim(c[0] - r, c[0] + r)
    ax.set_ylim(c[1] - r, c[1] + r)
    ax.set_zlim(c[2] - r, c[2] + r)
    ax.set_xlabel("R (mm)")
    ax.set_ylabel("A (mm)")
    ax.set_zlabel("S (mm)")
    ax.view_init(elev=25, azim=-60)
    ax.set_title("3-D view: skin, tumour and needle paths (CT world)", fontsize=10)
    fig.tight_layout()
    out.append(figs.save(fig, "trajectories_3d", "Skin surface (subsampled), tumour coloured by habitat and the "
                                                 "planned needle paths."))
    rows = []
    for t in trajs:
        clear = t.get("clearance_mm") or {}
        rows.append((t.get("name"), t.get("target"), t.get("region"), t.get("rank"), _fmt(t.get("length_mm")),
                     _fmt(t.get("angle_to_axial_deg")), _fmt(t.get("score"), 3),
                     ", ".join(f"{k} {v:.1f}" for k, v in sorted(clear.items(), key=lambda kv: kv[1])[:4])))
    out.append(_table(("path", "target", "region", "rank", "length (mm)", "angle to axial (deg)", "score",
                       "clearance to nearest structures (mm)"), rows, num_cols=(3, 4, 5, 6)))
    if plan.get("shared_entry_note"):
        out.append(f'<p class="note">{_esc(plan["shared_entry_note"])}</p>')
    rej = plan.get("rejections") or {}
    if rej:
        out.append("<p>Rejected candidate paths per target (first failed constraint):</p>")
        out.append(_table(("target", "candidates", "rejections"),
                          [(k, (plan.get("candidates") or {}).get(k, "-"),
                            ", ".join(f"{r} {c}" for r, c in v.items()) or "none") for k, v in rej.items()]))
    return "\n".join(out)


def _notch_docs(case: _Case) -> list[tuple[str, dict, dict | None]]:
    """[(target name, notch doc {"roi", "values"}, needle doc)] from sampling/<name>/ (or notch_values.json)."""
    docs = []
    for d in case.sampling_dirs():
        rel = f"sampling/{d.name}"
        notch = case.json(f"{rel}/notch.json")
        needle = case.json(f"{rel}/needle.json")
        if isinstance(needle, dict) and isinstance(needle.get("detection"), dict):
            needle = needle["detection"]  # {"detection": NeedleDetection.to_dict(), "simulated_truth": ...}
        if isinstance(notch, dict):
            values = notch.get("values") if isinstance(notch.get("values"), dict) else notch
            roi = notch.get("roi") or (values or {}).get("roi")
            docs.append((values.get("target_name") or d.name, {"roi": roi, "values": values}, needle))
        elif isinstance(needle, dict):
            docs.append((needle.get("target_name") or d.name, {}, needle))
    if not docs:
        allv = case.json("sampling/notch_values.json")
        items = []
        if isinstance(allv, dict):
            items = list(allv.get("targets", allv.values())) if "targets" in allv else list(allv.values())
        elif isinstance(allv, list):
            items = allv
        for v in items:
            if isinstance(v, dict):
                vals = v.get("values") if isinstance(v.get("values"), dict) else v
                docs.append((vals.get("target_name", "?"), {"roi": v.get("roi") or vals.get("roi"), "values": vals},
                             None))
    return docs


def _section_notch(case: _Case, figs: _Figures) -> str:
    out = []
    docs = _notch_docs(case)
    if not docs:
        return _na("Notch ROIs " + case.why("sampling", "sampling/<target>/notch.json"))
    needles = [(n, nd) for n, _, nd in docs if isinstance(nd, dict)]
    if needles:
        rows = [(n, _fmt(nd.get("tip_error_mm")), _fmt(nd.get("lateral_error_mm")), _fmt(nd.get("depth_error_mm")),
                 _fmt(nd.get("angle_deg")), _fmt(nd.get("visible_length_mm")), "; ".join(nd.get("warnings") or []))
                for n, nd in needles]
        out.append("<p>Needle found in each confirmation CT, against the plan:</p>")
        out.append(_table(("target", "tip error (mm)", "lateral (mm)", "depth (mm, + deeper)", "angle (deg)",
                           "visible length (mm)", "warnings"), rows, num_cols=(1, 2, 3, 4, 5)))
    maps = {k: case.volume(f"characterisation/{k}.nrrd") for k in ("adc", "ff", "ef")}
    maps = {k: v for k, v in maps.items() if v is not None}
    with_roi = [(n, d) for n, d, _ in docs if isinstance(d.get("roi"), dict)]
    if not maps:
        out.append(_na("Notch crops " + case.why("characterisation", "characterisation/adc.nrrd")))
    elif with_roi:
        fig = figs.new(3.3 * len(maps), 3.0 * len(with_roi) + 0.6)
        for r, (name, d) in enumerate(with_roi):
            roi = d["roi"]
            vals = d.get("values") or {}
            m2c = vals.get("mri_to_ct_ras")
            m2c = np.asarray(m2c, float) if m2c is not None else case.mri_to_ct()
            if m2c is None:
                m2c = np.eye(4)
            c2m = np.linalg.inv(m2c)
            centre_ct = np.asarray(roi["centre_ras"], float)
            axis_ct = _unit(roi["axis"])
            u_ct = _unit(roi.get("u_axis") or _perp_axial(axis_ct))
            centre = _apply(c2m, centre_ct)[0]
            a_m, u_m = _unit(c2m[:3, :3] @ axis_ct), _unit(c2m[:3, :3] @ u_ct)
            L = float(roi.get("length_mm", 10.0))
            hw = (roi.get("half_widths_mm") or [roi.get("radius_mm", 1.0)] * 2)[0]
            hs, hc = L / 2 + 12.0, 14.0
            for c, (mname, vol) in enumerate(maps.items()):
                ax = fig.add_subplot(len(with_roi), len(maps), r * len(maps) + c + 1)
                img = reslice(vol, centre, a_m, u_m, hs, hc, 0.25, order=0)
                lo, hi = _window(img, 2, 98)
                im = ax.imshow(img, cmap=MAP_CMAPS.get(mname, "viridis"), vmin=lo, vmax=hi,
                               extent=(-hs, hs, hc, -hc))
                ax.plot([-L / 2, L / 2, L / 2, -L / 2, -L / 2], [-hw, -hw, hw, hw, -hw], color="white", lw=1.8)
                ax.plot([-L / 2, L / 2, L / 2, -L / 2, -L / 2], [-hw, -hw, hw, hw, -hw], color="black", lw=0.7)
                ax.axhline(0, color="white", lw=0.6, ls=":")
                st = (vals.get("maps") or {}).get(mname) or {}
                ax.set_title(f"{name} - {mname.upper()} mean {_fmt(st.get('mean'))}", fontsize=9)
                ax.set_xlabel("mm along the needle")
                cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
                cb.set_label(MAP_UNITS.get(mname, ""), fontsize=8)
        fig.suptitle("Notch ROI (box outline) on every map, on the map's own voxels (MRI world)", fontsize=10)
        fig.tight_layout()
        out.append(figs.save(fig, "notch_rois", "Each map around the notch of each core, resliced on the plane of "
                                                "the needle axis; the outline is the sampled region."))
    rows = []
    for name, d, _ in docs:
        for mname, st in ((d.get("values") or {}).get("maps") or {}).items():
            rows.append((name, mname.upper(), st.get("units", MAP_UNITS.get(mname, "")), _fmt(st.get("mean")),
                         _fmt(st.get("median")), _fmt(st.get("min")), _fmt(st.get("max")), _fmt(st.get("sd")),
                         _fmt(st.get("coverage"), 2)))
    if rows:
        out.append(_table(("target", "map", "units", "mean", "median", "min", "max", "SD", "coverage"), rows,
                          num_cols=(3, 4, 5, 6, 7, 8)))
    else:
        out.append(_na("notch values not available (no map was sampled)"))
    return "\n".join(out)


def _pathology(case: _Case) -> dict:
    """pot_id -> {ki67_percent, nsr, fnclcc_grade} from specimens/pathology.csv (or the specimens table)."""
    out: dict[str, dict] = {}
    p = case.root / "specimens" / "pathology.csv"
    if p.is_file():
        try:
            from .specimen_journal import read_pathology_csv

            for row in read_pathology_csv(p):
                out[str(row.get("pot_id", "")).strip()] = {k: v for k, v in row.items() if k != "_line"}
        except Exception as exc:  # noqa: BLE001
            case.problems["specimens/pathology.csv"] = f"specimens/pathology.csv could not be read ({exc})"
    for r in case.csv("specimens/specimens.csv") or []:
        if r.get("ki67_percent") and r.get("pot_id") not in out:
            out[r["pot_id"]] = {k: r.get(k) for k in ("ki67_percent", "nsr", "fnclcc_grade")}
    return out


def _section_specimens(case: _Case, figs: _Figures) -> str:
    rows = case.csv("specimens/specimens.csv")
    if not rows:
        return _na("Specimen table " + case.why("specimens", "specimens/specimens.csv"))
    path = _pathology(case)
    maps = [m for m in ("adc", "ff", "ef") if any(f"{m}_mean" in r for r in rows)]
    header = ["pot", "region", "target", "time (UTC)", "operator"] + [f"{m.upper()} mean ± SD" for m in maps]
    has_path = bool(path)
    if has_path:
        header += ["Ki-67 (%)", "grade"]
    body = []
    for r in rows:
        row = [r.get("pot_id"), r.get("region"), r.get("target_name"), r.get("time_utc"), r.get("operator")]
        row += [f"{_fmt(r.get(f'{m}_mean'))} ± {_fmt(r.get(f'{m}_sd'))}" for m in maps]
        if has_path:
            pr = path.get(str(r.get("pot_id")), {})
            row += [_fmt(pr.get("ki67_percent")), pr.get("fnclcc_grade") or "-"]
        body.append(row)
    out = [_table(header, body)]
    if not has_path:
        out.append('<p class="note">No pathology results yet (specimens/pathology.csv absent).</p>')
    return "\n".join(out)


def _section_procedure(case: _Case, figs: _Figures) -> str:
    out = []
    proc = case.json("specimens/procedure.json")
    if isinstance(proc, dict):
        scans = [s for s in proc.get("scans") or [] if isinstance(s, dict)]
        out.append(_table(("item", "value"), [
            ("participant", proc.get("participant_id") or "-"), ("operator", proc.get("operator") or "-"),
            ("planning topogram", proc.get("planning_topogram_utc") or "-"),
            ("CT acquisitions", len(scans)), ("total DLP", f"{_fmt(proc.get('total_dlp_mgy_cm'))} mGy*cm"),
            ("elapsed", f"{_fmt(proc.get('elapsed_min'))} min (window {_fmt(proc.get('window_min'), 0)} min"
                        + (", EXCEEDED)" if proc.get("window_exceeded") else ")")),
            ("needle manipulations", ", ".join(f"{k} {v}" for k, v in (proc.get("manipulations") or {}).items())
             + f" (total {proc.get('total_manipulations', '-')})"),
            ("adverse events", "; ".join(f"{a.get('term')} grade {a.get('grade')}"
                                         for a in proc.get("adverse_events") or []) or "none")]))
        if scans:
            out.append(_table(("CT acquisition", "time (UTC)", "DLP (mGy*cm)"),
                              [(s.get("label"), s.get("time_utc"), _fmt(s.get("dlp_mgy_cm"))) for s in scans],
                              num_cols=(2,)))
            t0 = proc.get("planning_topogram_utc") or scans[0].get("time_utc")
            try:
                t0d = _dt.datetime.fromisoformat(str(t0).replace("Z", "+00:00"))
                mins = [(_dt.datetime.fromisoformat(str(s["time_utc"]).replace("Z", "+00:00")) - t0d).total_seconds()
                        / 60.0 for s in scans]
                dlp = np.array([float(s.get("dlp_mgy_cm") or 0.0) for s in scans])
                fig = figs.new(8, 3.6)
                ax = fig.add_subplot(111)
                ax.bar(mins, dlp, width=max(0.6, 0.012 * max(max(mins), 1.0)), color="#3b7dd8", label="DLP per scan")
                ax2 = ax.twinx()
                ax2.step([0.0] + mins, np.concatenate([[0.0], np.cumsum(dlp)]), where="post", color="#d93025",
                         label="cumulative DLP")
                win = float(proc.get("window_min") or 60.0)
                ax.axvline(win, color="#e69500", ls="--", label=f"{win:.0f} min window")
                for m_, s in zip(mins, scans):
                    ax.annotate(str(s.get("label")), (m_, 0), xytext=(0, 3), textcoords="offset points", rotation=90,
                                fontsize=7, va="bottom")
                ax.set_xlim(-1, max(win, max(mins)) + 3)
                ax.set_xlabel("minutes since the planning topogram")
                ax.set_ylabel("DLP (mGy*cm)")
                ax2.set_ylabel("cumulative DLP (mGy*cm)")
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = ax2.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
                ax.set_title("CT acquisitions over the procedure")
                fig.tight_layout()
                out.append(figs.save(fig, "procedure_timeline", "Dose-length product of each CT acquisition over "
                                                                "time, cumulative dose and the procedure window."))
            except (KeyError, TypeError, ValueError) as exc:
                out.append(f'<p class="note">timeline not drawn: {_esc(exc)}</p>')
    else:
        out.append(_na("Procedure log " + case.why("specimens", "specimens/procedure.json")))
    sess = case.json("robot/session.json")
    if isinstance(sess, dict):
        out.append(f"<p>Robot session: {'completed' if sess.get('completed') else 'NOT completed'}"
                   f"{' (cancelled)' if sess.get('cancelled') else ''}.</p>")
        if sess.get("auto_confirmed") or (case.summary.get("case") or {}).get("auto_confirmed"):
            out.append('<p class="note">Demo: the plan was confirmed automatically and the robot was a simulator.</p>')
        rows = [(t.get("name"), t.get("region"), t.get("state"), t.get("transmissions"),
                 _fmt(t.get("echo_error_mm"), 3),
                 _fmt(t.get("echo_error_deg"), 3), _fmt(t.get("reached_error_mm"), 2), t.get("robot_status") or "-")
                for t in sess.get("targets") or [] if isinstance(t, dict)]
        out.append(_table(("target", "region", "state", "sent", "echo error (mm)", "echo error (deg)",
                           "reached error (mm)", "robot status"), rows, num_cols=(3, 4, 5, 6)))
    else:
        out.append(_na("Robot session " + case.why("robot", "robot/session.json")))
    return "\n".join(out)


def _section_heterogeneity(case: _Case, figs: _Figures) -> str:
    path = _pathology(case)
    if not path:
        why = case.problems.get("specimens/pathology.csv")
        if why:
            return _na(f"not available ({why})")
        st = case.stage_for("specimens")
        if (st is not None and st.get("status") != "done") or (st is None and case.first_failed() is not None):
            return _na(case.why("specimens", "specimens/pathology.csv"))
        return _na("not available (no pathology results: specimens/pathology.csv is absent)")
    rows = case.csv("specimens/specimens.csv") or []
    sites = []
    for r in rows:
        pr = path.get(str(r.get("pot_id")))
        try:
            adc, ki = float(r.get("adc_mean")), float((pr or {}).get("ki67_percent"))
        except (TypeError, ValueError):
            continue
        sd = r.get("adc_sd")
        sites.append((r.get("pot_id"), r.get("region", ""), adc, float(sd) if sd not in (None, "") else 0.0, ki))
    if not sites:
        return _na("not available (no specimen has both an ADC value and a Ki-67 result)")
    synthetic = bool((case.summary.get("case") or {}).get("synthetic"))
    label = "synthetic pathology (phantom demo)" if synthetic else "pathology"
    adc_vol = case.volume("characterisation/adc.nrrd")
    tum = case.volume("characterisation/tumour.nrrd") or case.volume("characterisation/habitats.nrrd")
    tumour_adc = None
    if adc_vol is not None and tum is not None and tum.array.shape == adc_vol.array.shape:
        v = np.asarray(adc_vol.array, float)[np.asarray(tum.array) != 0]
        v = v[np.isfinite(v)]
        tumour_adc = v if v.size else None
    fig = figs.new(11, 4.4)
    ax = fig.add_subplot(1, 2, 1)
    if tumour_adc is not None:
        p5, p95 = np.percentile(tumour_adc, [5, 95])
        ax.axvspan(p5, p95, color="#9aa0a6", alpha=0.2, label=f"tumour ADC 5-95 % ({p5:.0f}-{p95:.0f})")
    for pot, reg, adc, sd, ki in sites:
        ax.errorbar([adc], [ki], xerr=[sd], fmt="o", ms=9, color=REGION_COLOURS.get(str(reg), (0.3, 0.3, 0.3)),
                    mec="k", capsize=3)
        ax.annotate(f"{pot} ({reg})", (adc, ki), xytext=(6, 4), textcoords="offset points", fontsize=8)
    adcs = np.array([s[2] for s in sites])
    kis = np.array([s[4] for s in sites])
    ax.set_xlabel("ADC in the notch, mean ± SD (10^-6 mm^2/s)")
    ax.set_ylabel(f"Ki-67 (%) - {label}")
    ax.set_title(f"per site: ADC vs Ki-67 ({label})", fontsize=10)
    ax.grid(alpha=0.3)
    if tumour_adc is not None:
        ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    if tumour_adc is not None:
        ax.hist(tumour_adc, bins=50, color="#9aa0a6", label="whole tumour")
    for pot, reg, adc, _, _ in sites:
        ax.axvline(adc, color=REGION_COLOURS.get(str(reg), (0.3, 0.3, 0.3)), lw=2.5, label=f"{pot} ({reg})")
    ax.set_xlabel("ADC (10^-6 mm^2/s)")
    ax.set_ylabel("voxels")
    ax.set_title(f"ADC range across sites {adcs.max() - adcs.min():.0f}; Ki-67 range {kis.max() - kis.min():.1f} %",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = [figs.save(fig, "heterogeneity", f"Within-tumour heterogeneity: ADC at each biopsy site against Ki-67 "
                                           f"({label}), and the sites within the whole-tumour ADC distribution.")]
    trows = [("ADC (10^-6 mm^2/s)", _fmt(adcs.min(), 0), _fmt(adcs.max(), 0), _fmt(adcs.max() - adcs.min(), 0),
              "-" if tumour_adc is None else f"{np.percentile(tumour_adc, 5):.0f}-{np.percentile(tumour_adc, 95):.0f}"),
             (f"Ki-67 (%) - {label}", _fmt(kis.min()), _fmt(kis.max()), _fmt(kis.max() - kis.min()), "-")]
    out.append(_table(("quantity", "min over sites", "max over sites", "range", "whole tumour 5-95 %"), trows,
                      num_cols=(1, 2, 3)))
    if synthetic:
        out.append('<p class="note">The pathology values of this case are synthetic (phantom demo); they show the '
                   "layout of the analysis, not a biological result.</p>")
    return "\n".join(out)


_SECTIONS = (_section_summary, _section_fusion, _section_habitats, _section_trajectories, _section_notch,
             _section_specimens, _section_procedure, _section_heterogeneity)


# ------------------------------------------------------------------------------------------------
def write_report(out_dir, title: str | None = None) -> str:
    """Write ``<out_dir>/report.html`` (self-contained) and ``<out_dir>/figures/*.png``; return the HTML path.

    Reads the case output folder described in the module docstring. A missing or unreadable artefact never
    raises: its section says ``not available (step <stage> did not finish: <message>)`` using the stage
    messages of ``summary.json``; a section whose drawing fails says so and the rest is still written.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    case = _Case(root)
    figs = _Figures(root / "figures")
    cinfo = (case.summary.get("case") or {}) if isinstance(case.summary, dict) else {}
    title = title or f"SmartBiopsy report - {cinfo.get('name', root.name)}"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"]
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f'<p class="note">Written {created}. Coordinates are RAS in mm; ADC in 10^-6 mm^2/s, FF and EF '
                 "in percent.</p>")
    if cinfo.get("synthetic"):
        parts.append('<p class="na">Synthetic case (digital phantom): not patient data.</p>')
    parts.append("<ul>" + "".join(f'<li><a href="#s{i + 1}">{_esc(t)}</a></li>' for i, t in enumerate(SECTION_TITLES))
                 + "</ul>")
    for i, (heading, fn) in enumerate(zip(SECTION_TITLES, _SECTIONS)):
        try:
            body = fn(case, figs)
        except Exception as exc:  # noqa: BLE001 - the report must still be written
            logger.exception("report section '%s' failed", heading)
            body = _na(f"not available (this section could not be drawn: {type(exc).__name__}: {exc})")
        parts.append(f'<section><h2 id="s{i + 1}">{_esc(heading)}</h2>\n{body}</section>')
    parts.append("</body></html>")
    path = root / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    logger.info("report written to %s (%d figures)", path, len(figs.paths))
    return str(path)

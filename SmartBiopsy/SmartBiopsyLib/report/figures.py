"""Report figures: colours and units, oblique reslicing, windowing, the figure store (PNG + base64) and
the checks that a figure is a real picture. matplotlib is used through its object-oriented API only
(``Figure`` + ``FigureCanvasAgg``: no pyplot, no global backend switch).

matplotlib is optional (3D Slicer does not bundle it): without it :meth:`FigureStore.new` hands the section a
stand-in figure that draws nothing, and :meth:`FigureStore.save` writes a sentence saying the figure was not
drawn and why, so every table and number of the report is still written; :attr:`FigureStore.missing` lists
the figures that were not drawn.
"""

from __future__ import annotations

from pathlib import Path
import base64
import io
import os

import numpy as np

from RegistrationFusionLib.registration.landmarks import apply_transform
from SmartBiopsyCoreLib import palette
from SmartBiopsyLib.report.html import esc


#: Habitat colours (label 1 A, 2 B, 3 C) and the same by region letter: the palette's, as everywhere else.
HABITAT_COLOURS = palette.HABITAT_COLOURS


REGION_COLOURS = palette.REGION_COLOURS

#: What each habitat is, for figure legends.
HABITAT_MEANINGS = {1: "A: low ADC, high enhancement", 2: "B: discordant", 3: "C: high ADC, low enhancement"}


MAP_UNITS = {"adc": "10^-6 mm^2/s", "ff": "%", "ef": "%"}


MAP_CMAPS = {"adc": "viridis", "ff": "magma", "ef": "inferno"}


CT_WINDOW_HU = (-200.0, 300.0)


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


def unit_vector(v) -> np.ndarray:
    v = np.asarray(v, float).reshape(3)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def perp_axial(d) -> np.ndarray:
    """Unit vector perpendicular to ``d`` and as close to the axial plane as possible."""
    w = np.cross(d, [0.0, 0.0, 1.0])
    if np.linalg.norm(w) < 1e-6:
        w = np.cross(d, [0.0, 1.0, 0.0])
    return unit_vector(w)


def apply_matrix(m, pts) -> np.ndarray:
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
        pts = apply_matrix(world_to_volume, pts)
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


def window_image(a, lo_pct=1.0, hi_pct=99.0):
    f = a[np.isfinite(a)]
    if f.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(f, [lo_pct, hi_pct])
    return float(lo), float(hi if hi > lo else lo + 1.0)


class NotDrawn:
    """Stands in for a matplotlib figure, and for everything reached from it, when matplotlib is missing.

    Every attribute, call, index and arithmetic gives the stand-in again and unpacking gives two of them, so a
    section's drawing code runs through without drawing anything; :meth:`FigureStore.save` recognises it.
    """

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __getitem__(self, key):
        return self

    def __iter__(self):
        return iter((self, self))

    def __add__(self, other):
        return self

    __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __neg__ = __add__


class FigureStore:
    def __init__(self, fig_dir: Path):
        self.dir = fig_dir
        self.paths: list[str] = []
        self.missing: list[str] = []  # names of the figures not drawn
        self._why_not: str | None = None

    @property
    def why_not(self) -> str:
        """Empty when figures can be drawn, else the sentence saying why not (matplotlib is not installed)."""
        if self._why_not is None:
            from SmartBiopsyCoreLib.optional import available, missing_sentence

            self._why_not = "" if available("matplotlib") else missing_sentence("matplotlib", "Report figures")
        return self._why_not

    def new(self, w, h, dpi=100):
        """A new figure (``w`` x ``h`` inches) on its own Agg canvas, or a :class:`NotDrawn` without matplotlib."""
        if self.why_not:
            return NotDrawn()
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(w, h), dpi=dpi)
        FigureCanvasAgg(fig)
        return fig

    def not_drawn(self, name: str, caption: str) -> str:
        """The note that stands where figure ``name`` would be, saying why it was not drawn."""
        self.missing.append(name)
        return f'<p class="na">Figure not drawn: {esc(caption)} {esc(self.why_not)}.</p>'

    def save(self, fig, name: str, caption: str) -> str:
        if isinstance(fig, NotDrawn):
            return self.not_drawn(name, caption)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{name}.png"
        buf = io.BytesIO()
        from SmartBiopsyCoreLib.display import save_png

        save_png(fig, buf, metadata={"Software": None})
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
        return (f'<figure id="fig-{esc(name, True)}"><img alt="{esc(caption, True)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>")


def habitat_rgba(lab: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """RGBA image of a habitat label slice: each habitat in exactly its palette colour (opaque by default, so
    that a habitat never shows in two shades over bright and dark anatomy), transparent elsewhere. Show it with
    ``interpolation="nearest"``: smoothing would blend the colours at region borders into new shades."""
    rgba = np.zeros(lab.shape + (4,), float)
    for code, col in HABITAT_COLOURS.items():
        sel = lab == code
        rgba[sel, :3] = col
        rgba[sel, 3] = alpha
    return rgba


def habitat_legend_handles(codes=(1, 2, 3)) -> list:
    """Legend patches for the habitats ``codes`` in their palette colours, with what each habitat means."""
    try:
        from matplotlib.patches import Patch
    except ImportError:  # no matplotlib: nothing is drawn (FigureStore.new gave a stand-in figure)
        return []
    return [Patch(facecolor=HABITAT_COLOURS[c], edgecolor="black", linewidth=0.5, label=HABITAT_MEANINGS[c])
            for c in codes if c in HABITAT_COLOURS]

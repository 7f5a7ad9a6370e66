"""How every image panel is shown: one radiological convention, orientation letters and a millimetre scale bar.

A display frame is two unit RAS vectors: ``u`` points to the screen's right (increasing image column) and ``v``
to the screen's bottom (increasing image row). The radiological convention of :data:`VIEW_FRAMES` puts the
patient's right on the image's left in axial and coronal views (``u`` = L, i.e. -x in RAS), anterior at the top
of axial views, superior at the top of coronal and sagittal views and anterior on the left of sagittal views,
as 3D Slicer's slice views do. :func:`orientation_letters` names the four screen edges with R/L/A/P/S/I (oblique
directions get the letters of their two largest components, e.g. "RA"); :func:`draw_orientation_letters` and
:func:`draw_scale_bar` put them on a matplotlib axes (duck-typed: this module imports no matplotlib).
:func:`display_axes`, :func:`oriented_slice` and :func:`oriented_mip` take a volume's own voxel grid to that
convention (nearest voxel axis for each screen direction) with the image extent in mm, so that RAS points
are drawn at ``((p - centre) . u, (p - centre) . v)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Letters of the +/- RAS axes.
AXIS_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))

#: Radiological display frames: (u screen-right, v screen-down) in RAS.
VIEW_FRAMES = {
    "axial": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),     # patient right on image left, anterior at the top
    "coronal": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),   # patient right on image left, superior at the top
    "sagittal": ((0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),  # anterior on image left, superior at the top
}

#: A second letter is added when its component is at least this fraction of the vector (about 22 degrees).
SECOND_LETTER_FRACTION = 0.38


def direction_letters(vec, second_fraction: float = SECOND_LETTER_FRACTION) -> str:
    """Anatomical letters of an RAS direction: the largest component's letter, followed by the second largest
    one's when that component is at least ``second_fraction`` of the unit vector (``(1, 1, 0)`` -> ``"RA"``)."""
    v = np.asarray(vec, float).reshape(3)
    n = np.linalg.norm(v)
    if n == 0:
        return ""
    v = v / n
    order = np.argsort(-np.abs(v), kind="stable")
    letters = ""
    for rank, axis in enumerate(order[:2]):
        if rank == 1 and abs(v[axis]) < second_fraction:
            break
        letters += AXIS_LETTERS[axis][0 if v[axis] > 0 else 1]
    return letters


def orientation_letters(u, v) -> dict:
    """{"left", "right", "top", "bottom"}: the letters of the directions the four screen edges point to, for a
    display frame ``u`` (screen right) and ``v`` (screen down) in RAS."""
    u, v = np.asarray(u, float), np.asarray(v, float)
    return {"left": direction_letters(-u), "right": direction_letters(u), "top": direction_letters(-v),
            "bottom": direction_letters(v)}


def draw_orientation_letters(ax, u, v, fontsize: float = 10, colour: str = "white") -> dict:
    """Write the orientation letters at the middle of the four edges of ``ax`` (inside the image, on a dark
    box); returns the letters. ``u``/``v`` must be what the axes shows to the right and downwards."""
    letters = orientation_letters(u, v)
    box = {"boxstyle": "round,pad=0.15", "facecolor": "black", "alpha": 0.6, "linewidth": 0}
    place = {"left": (0.015, 0.5, "left", "center"), "right": (0.985, 0.5, "right", "center"),
             "top": (0.5, 0.985, "center", "top"), "bottom": (0.5, 0.015, "center", "bottom")}
    for edge, (x, y, ha, va) in place.items():
        if letters[edge]:
            ax.text(x, y, letters[edge], transform=ax.transAxes, ha=ha, va=va, fontsize=fontsize,
                    fontweight="bold", color=colour, bbox=box, zorder=20)
    return letters


def nice_length(max_mm: float) -> float:
    """The largest of 1, 2, 5 x 10^n mm not above ``max_mm`` (at least 1 mm)."""
    if not np.isfinite(max_mm) or max_mm <= 1.0:
        return 1.0
    e = 10.0 ** np.floor(np.log10(max_mm))
    for m in (5.0, 2.0, 1.0):
        if m * e <= max_mm:
            return float(m * e)
    return float(e)


def draw_scale_bar(ax, mm_per_unit: float = 1.0, fraction: float = 0.25, colour: str = "white",
                   fontsize: float = 9) -> float:
    """A horizontal scale bar (a 1/2/5 x 10^n mm length about ``fraction`` of the axes width) in the lower
    right corner of ``ax``; data units are ``mm_per_unit`` mm. Returns the bar's length in mm."""
    try:
        x0, x1 = (float(x) for x in ax.get_xlim())
        y0, y1 = (float(y) for y in ax.get_ylim())
    except TypeError:  # a stand-in axes that draws nothing (no matplotlib)
        return 0.0
    width_mm = abs(x1 - x0) * mm_per_unit
    length = nice_length(fraction * width_mm)
    units = length / mm_per_unit
    sx = 1.0 if x1 > x0 else -1.0
    sy = 1.0 if y1 > y0 else -1.0  # sy < 0: the y axis runs downwards (image rows)
    right = x1 - sx * 0.05 * abs(x1 - x0)
    base = y0 + sy * 0.1 * abs(y1 - y0)
    xs = [right - sx * units, right]
    ax.plot(xs, [base, base], color="black", lw=5, solid_capstyle="butt", zorder=19)
    ax.plot(xs, [base, base], color=colour, lw=3, solid_capstyle="butt", zorder=20)
    label = f"{length:g} mm"
    ax.text(0.5 * (xs[0] + xs[1]), base + sy * 0.015 * abs(y1 - y0), label, ha="center", va="bottom",
            color=colour, fontsize=fontsize, fontweight="bold", zorder=20,
            bbox={"boxstyle": "round,pad=0.1", "facecolor": "black", "alpha": 0.5, "linewidth": 0})
    return length


@dataclass
class DisplayAxis:
    """One screen direction of a voxel grid: which voxel axis (0 i, 1 j, 2 k) runs along it, whether it runs
    backwards, its spacing (mm) and the RAS unit vector the screen direction really shows."""

    voxel_axis: int
    flip: bool
    spacing_mm: float
    direction_ras: np.ndarray


def display_axes(ijk_to_ras, view: str) -> tuple[DisplayAxis, DisplayAxis, DisplayAxis]:
    """(rows, cols, depth) of a grid shown in ``view`` (a :data:`VIEW_FRAMES` name) in the radiological
    convention: each screen direction takes the voxel axis nearest to it; the depth axis is the remaining one.
    For an oblique grid the returned directions are the grid's own (so the letters stay honest)."""
    m = np.asarray(ijk_to_ras, float)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    dirs = m / spacing
    u, v = (np.asarray(x, float) for x in VIEW_FRAMES[view])
    col_axis = int(np.argmax(np.abs(u @ dirs)))
    rest = [a for a in range(3) if a != col_axis]
    row_axis = rest[int(np.argmax(np.abs(v @ dirs[:, rest])))]
    depth_axis = 3 - col_axis - row_axis
    out = []
    for axis, want in ((row_axis, v), (col_axis, u), (depth_axis, np.cross(v, u))):
        flip = bool(want @ dirs[:, axis] < 0)
        out.append(DisplayAxis(axis, flip, float(spacing[axis]), dirs[:, axis] * (-1.0 if flip else 1.0)))
    return tuple(out)


@dataclass
class OrientedImage:
    """A 2-D image ready for ``imshow(image, extent=extent)`` (origin upper): rows run along ``v``, columns
    along ``u`` (RAS unit vectors), ``extent`` (left, right, bottom, top) in mm with the centre point at 0, 0."""

    view: str
    image: np.ndarray
    extent: tuple
    u: np.ndarray
    v: np.ndarray

    def to_display(self, ras, centre) -> np.ndarray:
        """(N, 2) display coordinates (mm) of RAS points."""
        d = np.atleast_2d(np.asarray(ras, float)) - np.asarray(centre, float)
        return np.stack([d @ self.u, d @ self.v], axis=1)


def _orient(array_kji, axes):
    rows, cols, depth = axes
    a = np.moveaxis(np.asarray(array_kji), [2 - rows.voxel_axis, 2 - cols.voxel_axis, 2 - depth.voxel_axis],
                    [0, 1, 2])
    return a[::-1 if rows.flip else 1, ::-1 if cols.flip else 1, ::-1 if depth.flip else 1]


def _extent(shape2, centre_idx, rows, cols):
    """extent for imshow of an (nrows, ncols) image whose centre point sits at continuous index centre_idx."""
    r0, c0 = centre_idx
    left, right = (-0.5 - c0) * cols.spacing_mm, (shape2[1] - 0.5 - c0) * cols.spacing_mm
    top, bottom = (-0.5 - r0) * rows.spacing_mm, (shape2[0] - 0.5 - r0) * rows.spacing_mm
    return (left, right, bottom, top)


def _display_index(ijk, axis: DisplayAxis, n: int) -> float:
    i = float(ijk[axis.voxel_axis])
    return (n - 1 - i) if axis.flip else i


def oriented_slice(volume, point_ras, view: str) -> OrientedImage:
    """The slice of ``volume`` (a RasVolume) through the voxel nearest ``point_ras`` in ``view``, shown in the
    radiological convention; raises ValueError when the point lies outside the volume."""
    axes = display_axes(volume.ijk_to_ras, view)
    ijk = volume.ras_to_ijk_points(np.asarray(point_ras, float).reshape(1, 3))[0]
    a = _orient(volume.array, axes)
    rows, cols, depth = axes
    idx = [_display_index(ijk, ax, n) for ax, n in zip(axes, a.shape)]
    d = int(round(idx[2]))
    if not all(-0.5 <= i <= n - 0.5 for i, n in zip(idx, a.shape)) or not 0 <= d < a.shape[2]:
        raise ValueError("the point lies outside the volume")
    img = a[:, :, d]
    return OrientedImage(view, img, _extent(img.shape, idx[:2], rows, cols), cols.direction_ras, rows.direction_ras)


def oriented_mip(array_kji, ijk_to_ras, centre_ijk, view: str) -> OrientedImage:
    """Maximum-intensity projection of a voxel block (``array_kji`` with grid ``ijk_to_ras``) along ``view``'s
    depth, shown in the radiological convention with the block's point ``centre_ijk`` at display 0, 0."""
    axes = display_axes(ijk_to_ras, view)
    a = _orient(array_kji, axes)
    rows, cols, _ = axes
    idx = [_display_index(centre_ijk, ax, n) for ax, n in zip(axes, a.shape)]
    img = a.max(axis=2)
    return OrientedImage(view, img, _extent(img.shape, idx[:2], rows, cols), cols.direction_ras, rows.direction_ras)


#: zlib level of the saved figures: on the demo's figures level 3 encodes in about half the time of the default 6
#: for 5 % more bytes (the pixels are the same).
PNG_COMPRESS_LEVEL = 3


def save_png(fig, target, **kwargs) -> None:
    """Save a matplotlib figure (duck-typed) as PNG to ``target`` (path or binary file) with one rendering pass.

    After ``fig.tight_layout()`` the figure keeps a placeholder layout engine, and ``savefig`` then draws the whole
    figure a first time without output before drawing it for the file. The axes are already placed, so the
    placeholder is dropped first: the same pixels for half the drawing (unless the matplotlib settings ask for an
    automatic layout, which is then kept). The PNG is compressed at zlib level :data:`PNG_COMPRESS_LEVEL` unless
    ``pil_kwargs`` says otherwise (lossless either way)."""
    kwargs.setdefault("pil_kwargs", {"compress_level": PNG_COMPRESS_LEVEL})
    engine = fig.get_layout_engine() if hasattr(fig, "get_layout_engine") else None
    if engine is not None and type(engine).__name__ == "PlaceHolderLayoutEngine":
        fig.set_layout_engine(None)
        if fig.get_layout_engine() is not None:  # rcParams ask for tight/constrained layout: leave it as it was
            fig.set_layout_engine(engine)
    fig.savefig(target, format="png", **kwargs)

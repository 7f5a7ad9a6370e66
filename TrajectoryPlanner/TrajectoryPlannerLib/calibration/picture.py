"""The calibration picture: maximum-intensity projections of the CT around the frame, three orthogonal views in
the radiological convention (patient right on the image's left; SmartBiopsyCoreLib.display) with orientation
letters and a mm scale bar, the fitted model drawn over them and each fiducial's residual. matplotlib's object-oriented API only
(no pyplot, no global backend); without matplotlib the picture is skipped with a sentence."""
from __future__ import annotations

import logging

import numpy as np

from SmartBiopsyCoreLib.display import draw_orientation_letters, draw_scale_bar, oriented_mip, save_png
from SmartBiopsyCoreLib.geometry import RasVolume
from SmartBiopsyCoreLib.palette import ENTRY_COLOUR
from TrajectoryPlannerLib.calibration.frame_fit import CalibrationResult

logger = logging.getLogger(__name__)


def write_calibration_picture(ct: RasVolume, result: CalibrationResult, path, margin_mm: float = 20.0) -> str | None:
    """Write the PNG at ``path``; returns the path, or None (and logs why) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        logger.warning("calibration picture not drawn: matplotlib is not installed")
        return None
    m = result.matrix_robot_to_ct_ras
    model = result.model
    if model.tubes:
        segs = [(t.name, m[:3, :3] @ t.start + m[:3, 3], m[:3, :3] @ t.end + m[:3, 3]) for t in model.tubes]
        pts = np.array([p for _, a, b in segs for p in (a, b)])
    else:
        segs = [(s.name, m[:3, :3] @ s.centre + m[:3, 3], None) for s in model.spheres]
        pts = np.array([a for _, a, _ in segs])
    lo, hi = pts.min(0) - margin_mm, pts.max(0) + margin_mm
    ijk = ct.ras_to_ijk_points(np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]))
    i0 = np.maximum(np.floor(ijk.min(0)).astype(int), 0)
    i1 = np.minimum(np.ceil(ijk.max(0)).astype(int) + 1, np.array(ct.shape_kji)[::-1])
    sub = ct.array[i0[2]:i1[2], i0[1]:i1[1], i0[0]:i1[0]].astype(np.float32)
    crop = ct.ijk_to_ras.copy()
    crop[:3, 3] = ct.ijk_to_ras_points(i0[None].astype(float))[0]  # the block's own grid
    centre = 0.5 * (pts.min(0) + pts.max(0))
    centre_ijk = ct.ras_to_ijk_points(centre[None])[0] - i0
    fig = Figure(figsize=(12, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    for n, view in enumerate(("axial", "coronal", "sagittal")):
        ax = fig.add_subplot(1, 3, n + 1)
        mip = oriented_mip(sub, crop, centre_ijk, view)
        ax.set_facecolor("black")
        ax.imshow(mip.image, cmap="gray", vmin=-1000, vmax=max(float(model.hu_nominal), 200.0), extent=mip.extent,
                  interpolation="nearest")
        for name, a, b in segs:
            xy = mip.to_display([a] if b is None else [a, b], centre)
            ax.plot(xy[:, 0], xy[:, 1], "-o" if b is None else "-", color=ENTRY_COLOUR, mec="black", lw=1.5, ms=5)
            res = result.residuals_mm.get(name)
            ax.annotate(f"{name} {res:.2f} mm" if res is not None else name, tuple(xy.mean(axis=0)),
                        xytext=(4, 4), textcoords="offset points", color="white", fontsize=8,
                        bbox={"boxstyle": "round,pad=0.1", "facecolor": "black", "alpha": 0.5, "linewidth": 0})
        ax.set_xlim(mip.extent[0], mip.extent[1])
        ax.set_ylim(mip.extent[2], mip.extent[3])
        ax.set_title(f"{view} MIP", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        draw_orientation_letters(ax, mip.u, mip.v)
        draw_scale_bar(ax)
    fig.legend(handles=[Line2D([], [], ls="none", marker="o", color=ENTRY_COLOUR, mec="black",
                               label="fitted frame model (fiducial), with its residual")],
               loc="lower center", fontsize=9, frameon=False)
    fig.suptitle(f"Robot calibration {model.name}: residual RMS {result.rms_mm:.2f} mm, QA "
                 f"{'PASSED' if result.passed else 'FAILED'} (fitted model in orange; residual per fiducial)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_png(fig, str(path))
    return str(path)

"""The calibration picture: maximum-intensity projections of the CT around the frame, three orthogonal views,
with the fitted model drawn over them and each fiducial's residual. matplotlib's object-oriented API only
(no pyplot, no global backend); without matplotlib the picture is skipped with a sentence."""
from __future__ import annotations

import logging

import numpy as np

from SmartBiopsyCoreLib.geometry import RasVolume
from TrajectoryPlannerLib.calibration.frame_fit import CalibrationResult

logger = logging.getLogger(__name__)


def write_calibration_picture(ct: RasVolume, result: CalibrationResult, path, margin_mm: float = 20.0) -> str | None:
    """Write the PNG at ``path``; returns the path, or None (and logs why) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
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
    fig = Figure(figsize=(12, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    views = (("axial (k)", 0, (0, 1)), ("coronal (j)", 1, (0, 2)), ("sagittal (i)", 2, (1, 2)))
    for n, (title, axis, (u, v)) in enumerate(views):
        ax = fig.add_subplot(1, 3, n + 1)
        mip = sub.max(axis=axis)
        ax.imshow(mip, cmap="gray", vmin=-1000, vmax=max(float(model.hu_nominal), 200.0), origin="lower",
                  interpolation="nearest")
        for name, a, b in segs:
            ends = [a] if b is None else [a, b]
            ij = ct.ras_to_ijk_points(np.array(ends)) - i0  # (i, j, k) in the crop
            cols = {0: ij[:, 0], 1: ij[:, 1], 2: ij[:, 2]}
            x_img, y_img = (cols[0], cols[1]) if axis == 0 else ((cols[0], cols[2]) if axis == 1 else (cols[1], cols[2]))
            ax.plot(x_img, y_img, "-o" if b is None else "-", color="#ff7f0e", lw=1.2, ms=4)
            res = result.residuals_mm.get(name)
            ax.annotate(f"{name} {res:.2f} mm" if res is not None else name, (float(np.mean(x_img)), float(np.mean(y_img))),
                        color="#1f77b4", fontsize=7)
        ax.set_title(f"{title} MIP", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Robot calibration {model.name}: residual RMS {result.rms_mm:.2f} mm, QA "
                 f"{'PASSED' if result.passed else 'FAILED'} (fitted model in orange; residual per fiducial)",
                 fontsize=10)
    fig.savefig(str(path))
    return str(path)

"""Report section: planned trajectories on the CT (reslices along each path, 3-D view)."""

from __future__ import annotations

import logging

import numpy as np

from SmartBiopsyLib.report.case import CaseFolder
from SmartBiopsyCoreLib import palette
from SmartBiopsyCoreLib.display import draw_orientation_letters, draw_scale_bar
from SmartBiopsyLib.report.figures import CT_WINDOW_HU, HABITAT_COLOURS, REGION_COLOURS, FigureStore, apply_matrix, perp_axial, unit_vector, reslice
from SmartBiopsyLib.report.html import esc, fmt_num, na_note, html_table
from SmartBiopsyLib.report.words import plain

logger = logging.getLogger(__name__)


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


def _skin_points(case: CaseFolder, ct, centre=None, radius_mm: float | None = None,
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


def _all_skin_points(case: CaseFolder, ct) -> np.ndarray | None:
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

    from SmartBiopsyCoreLib.body import body_mask_array, subsampled
    from SmartBiopsyCoreLib.errors import InputDataError

    stride = np.maximum(1, np.round(4.0 / ct.spacing[::-1]).astype(int))
    try:
        body = body_mask_array(subsampled(ct, stride))
    except InputDataError:
        return None
    surf = body & ~ndimage.binary_erosion(body, border_value=1)  # the CT's end slices are not skin
    return ct.kji_to_ras_points(np.argwhere(surf) * stride)


def _tumour_points_ct(case: CaseFolder, max_points: int = 2500):
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
    return apply_matrix(m, vol.kji_to_ras_points(idx)), codes


def path_legend_handles(skin: bool = False, habitats=()) -> list:
    """Legend entries of the path figures: needle, skin entry, target, planned notch tip (and skin and the
    habitats when the 3-D view shows them)."""
    try:
        from matplotlib.lines import Line2D
    except ImportError:  # no matplotlib: nothing is drawn
        return []
    from SmartBiopsyLib.report.figures import habitat_legend_handles

    h = [Line2D([], [], color=palette.NEEDLE_COLOUR, lw=3, label="planned needle"),
         Line2D([], [], ls="none", marker="o", ms=7, color=palette.ENTRY_COLOUR, mec="black", label="skin entry"),
         Line2D([], [], ls="none", marker="X", ms=9, color="white", mec="black",
                label="target (in its habitat's colour)"),
         Line2D([], [], ls="none", marker="D", ms=7, color=palette.NOTCH_TIP_COLOUR, mec="black",
                label="planned notch tip")]
    if skin:
        h.append(Line2D([], [], ls="none", marker=".", ms=6, color="#8b5a2b", label="skin"))
    h += habitat_legend_handles(habitats)
    if any(int(c) not in HABITAT_COLOURS for c in habitats):
        h.append(Line2D([], [], ls="none", marker="s", ms=7, color=palette.NEUTRAL_COLOUR, mec="black",
                        label="tumour outside the habitats"))
    return h


def draw_path_reslice(ax, ct, t: dict) -> dict:
    """One oblique CT panel containing the path ``t`` (plan.json trajectory, CT RAS mm): the needle drawn from
    the skin entry to the planned notch tip only, the target and the planned notch tip marked apart, the
    letters of the nearest anatomical directions on the four edges and a mm scale bar. The image's columns
    run along the needle, its rows across it in the plane nearest axial, oriented as close to the radiological
    axial view as the plane allows (patient right towards the left edge, anterior towards the top). Returns
    the display coordinates (mm) {"entry", "target", "tip"}."""
    e = np.asarray(t["entry_ras"], float)
    g = np.asarray(t["target_ras"], float)
    tip = np.asarray(t["tip_ras"], float) if t.get("tip_ras") is not None else g
    d = unit_vector(g - e)
    w = perp_axial(d)
    if d[0] > 0:  # screen right towards the patient's left
        d = -d
    if w[1] > 0:  # screen down towards posterior
        w = -w
    centre = 0.5 * (e + tip)
    pts = {k: np.array([(p - centre) @ d, (p - centre) @ w]) for k, p in (("entry", e), ("target", g), ("tip", tip))}
    hu = float(np.linalg.norm(tip - e)) / 2 + 20.0
    hv = max(30.0, 0.55 * hu)
    img = reslice(ct, centre, d, w, hu, hv, 0.5, order=1)
    ax.set_facecolor("black")
    ax.imshow(img, cmap="gray", vmin=CT_WINDOW_HU[0], vmax=CT_WINDOW_HU[1], extent=(-hu, hu, hv, -hv))
    (xe, ye), (xg, yg), (xt, yt) = pts["entry"], pts["target"], pts["tip"]
    ax.plot([xe, xt], [ye, yt], color="black", lw=3.2, solid_capstyle="butt")
    ax.plot([xe, xt], [ye, yt], color=palette.NEEDLE_COLOUR, lw=1.8, solid_capstyle="butt")
    ax.plot([xe], [ye], "o", color=palette.ENTRY_COLOUR, mec="black", ms=7)
    ax.plot([xt], [yt], "D", color=palette.NOTCH_TIP_COLOUR, mec="black", ms=7)
    ax.plot([xg], [yg], "X", color=REGION_COLOURS.get(str(t.get("region")), palette.NEUTRAL_COLOUR), mec="black",
            ms=10)
    ax.annotate("target", (xg, yg), xytext=(-4, 9), textcoords="offset points", ha="right", fontsize=8,
                color="white", bbox={"boxstyle": "round,pad=0.1", "facecolor": "black", "alpha": 0.5, "linewidth": 0})
    ax.annotate("planned notch tip", (xt, yt), xytext=(0, -16), textcoords="offset points", ha="center",
                fontsize=8, color="white",
                bbox={"boxstyle": "round,pad=0.1", "facecolor": "black", "alpha": 0.5, "linewidth": 0})
    ax.set_xlim(-hu, hu)
    ax.set_ylim(hv, -hv)
    clear = t.get("clearance_mm") or {}
    worst = min(clear.items(), key=lambda kv: kv[1]) if clear else None
    ax.set_title(f"{t.get('name', t.get('target'))}: {fmt_num(t.get('length_mm'))} mm, "
                 f"{fmt_num(t.get('angle_to_axial_deg'))} deg to axial"
                 + (f"\nclosest: {worst[0]} {worst[1]:.1f} mm" if worst else ""), fontsize=9)
    ax.set_xlabel("along the needle (mm)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    draw_orientation_letters(ax, d, w)
    draw_scale_bar(ax)
    return pts


def draw_paths_3d(ax, trajs, tpts, codes, skin, c, r) -> None:
    """The 3-D view: skin points, tumour points in their habitat's exact palette colour (no depth shading,
    opaque) and each path from the skin entry to the planned notch tip in the needle colour drawn over the
    tumour, with its target in its habitat's colour and its planned notch tip marked apart. ``c``, ``r``: the
    centre and half-size (mm) of the cube shown."""
    ax.computed_zorder = False  # draw in the order given: the paths stay visible over the tumour
    if skin is not None and len(skin):
        ax.scatter(skin[:, 0], skin[:, 1], skin[:, 2], s=2, c="#8b5a2b", alpha=0.35, depthshade=False, zorder=1)
    if tpts is not None:
        cols = np.array([HABITAT_COLOURS.get(int(k), palette.NEUTRAL_COLOUR) for k in codes])
        ax.scatter(tpts[:, 0], tpts[:, 1], tpts[:, 2], s=4, c=cols, alpha=1.0, depthshade=False, zorder=2)
    for t in trajs:
        e = np.asarray(t["entry_ras"], float)
        g = np.asarray(t["target_ras"], float)
        tip = np.asarray(t.get("tip_ras") or t["target_ras"], float)
        ax.plot([e[0], tip[0]], [e[1], tip[1]], [e[2], tip[2]], color="black", lw=4.5, zorder=5)
        ax.plot([e[0], tip[0]], [e[1], tip[1]], [e[2], tip[2]], color=palette.NEEDLE_COLOUR, lw=2.8, zorder=6)
        ax.scatter([e[0]], [e[1]], [e[2]], color=palette.ENTRY_COLOUR, edgecolors="black", s=30, depthshade=False,
                   zorder=7)
        ax.scatter([tip[0]], [tip[1]], [tip[2]], marker="D", color=palette.NOTCH_TIP_COLOUR, edgecolors="black",
                   s=30, depthshade=False, zorder=7)
        ax.scatter([g[0]], [g[1]], [g[2]], marker="X", color=REGION_COLOURS.get(str(t.get("region")),
                                                                                 palette.NEUTRAL_COLOUR),
                   edgecolors="black", s=60, depthshade=False, zorder=8)
    # each path's name beyond its skin entry, stacked in S so that neighbouring entries keep readable names
    for k, t in enumerate(trajs):
        e = np.asarray(t["entry_ras"], float)
        tip = np.asarray(t.get("tip_ras") or t["target_ras"], float)
        at = e - 18.0 * unit_vector(tip - e) + np.array([0.0, 0.0, 0.12 * r * (k - (len(trajs) - 1) / 2)])
        ax.plot(*np.array([at, e]).T, color="black", lw=0.6, zorder=9)
        ax.text(*at, str(t.get("target", t.get("name"))), fontsize=8, ha="right", va="center", zorder=10,
                bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "alpha": 0.8, "linewidth": 0})
    ax.set_xlim(c[0] - r, c[0] + r)
    ax.set_ylim(c[1] - r, c[1] + r)
    ax.set_zlim(c[2] - r, c[2] + r)
    ax.set_xlabel("R (mm)")
    ax.set_ylabel("A (mm)")
    ax.set_zlabel("S (mm)")
    ax.view_init(elev=25, azim=-60)


def section_trajectories(case: CaseFolder, figs: FigureStore) -> str:
    out = []
    plan = case.json("plan/plan.json")
    if not isinstance(plan, dict):
        return na_note("Trajectories " + case.why("plan", "plan/plan.json"))
    trajs, which = _chosen_trajectories(plan)
    ct = case.volume("inputs/ct.nrrd")
    for name, msg in (plan.get("failures") or {}).items():
        out.append(f'<p class="fail">{esc(name)}: {esc(msg)}</p>')
    if not trajs:
        out.append(na_note("no trajectory in plan/plan.json (no safe path was found)"))
        return "\n".join(out)
    if ct is None:
        out.append(na_note("Reslices along the paths " + case.why("inputs", "inputs/ct.nrrd")))
    else:
        ncol = min(len(trajs), 3)
        nrow = (len(trajs) + ncol - 1) // ncol
        fig = figs.new(3.9 * ncol, 3.1 * nrow + 0.8)
        for i, t in enumerate(trajs):
            ax = fig.add_subplot(nrow, ncol, i + 1)
            draw_path_reslice(ax, ct, t)
        fig.legend(handles=path_legend_handles(), loc="lower center", ncol=4, fontsize=9, frameon=False)
        fig.suptitle(f"CT resliced on the plane containing each needle path ({which})", fontsize=10)
        fig.tight_layout(rect=(0, 0.1 / nrow, 1, 1))
        out.append(figs.save(fig, "trajectories_reslice",
                             "Oblique CT reslice containing each planned path: skin entry (o), target (X, in its "
                             "habitat's colour) and the planned notch tip (diamond) where the needle stops so that "
                             "the notch is centred on the target; letters name the nearest anatomical directions. "
                             f"CT window {CT_WINDOW_HU[0]:.0f} to {CT_WINDOW_HU[1]:.0f} HU."))
    # 3-D view
    tpts, codes = _tumour_points_ct(case)
    fig = figs.new(7.5, 6.5)
    ax = fig.add_subplot(111, projection="3d")  # matplotlib registers the 3d projection itself
    focus = [np.array([np.asarray(t["entry_ras"], float), np.asarray(t.get("tip_ras") or t["target_ras"], float)])
             for t in trajs]
    if tpts is not None:
        focus.append(tpts)
    f = np.concatenate(focus)
    c = 0.5 * (f.min(axis=0) + f.max(axis=0))
    r = 0.5 * float(np.max(f.max(axis=0) - f.min(axis=0))) + 40.0  # the paths and the tumour with 40 mm around
    skin = _skin_points(case, ct, c, r)
    draw_paths_3d(ax, trajs, tpts, codes, skin, c, r)
    fig.legend(handles=path_legend_handles(skin=skin is not None and len(skin) > 0,
                                           habitats=sorted({int(k) for k in codes}) if tpts is not None else ()),
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax.set_title("3-D view: skin, tumour and needle paths (CT world)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out.append(figs.save(fig, "trajectories_3d", "Skin surface (subsampled), tumour coloured by habitat and the "
                                                 "planned needle paths from the skin entry to the planned notch "
                                                 "tip, with each target marked in its habitat's colour."))
    rows = []
    for t in trajs:
        clear = t.get("clearance_mm") or {}
        rows.append((t.get("name"), t.get("target"), t.get("region"), t.get("rank"), fmt_num(t.get("length_mm")),
                     fmt_num(t.get("angle_to_axial_deg")), fmt_num(t.get("score"), 3),
                     ", ".join(f"{plain(k)} {v:.1f}" for k, v in sorted(clear.items(), key=lambda kv: kv[1])[:4])))
    out.append(html_table(("path", "target", "region", "rank", "length (mm)", "angle to axial (deg)", "score",
                       "clearance to nearest structures (mm)"), rows, num_cols=(3, 4, 5, 6)))
    if plan.get("shared_entry_note"):
        out.append(f'<p class="note">{esc(plan["shared_entry_note"])}</p>')
    rej = plan.get("rejections") or {}
    if rej:
        out.append("<p>Rejected candidate paths per target (first failed constraint):</p>")
        out.append(html_table(("target", "candidates", "rejections"),
                          [(k, (plan.get("candidates") or {}).get(k, "-"),
                            "; ".join(f"{plain(r)}: {c}" for r, c in v.items()) or "none") for k, v in rej.items()]))
    return "\n".join(out)

"""Report section: habitat map A/B/C with the targets and their signatures."""

from __future__ import annotations

import numpy as np

from SmartBiopsyLib.report.case import CaseFolder
from SmartBiopsyCoreLib.display import VIEW_FRAMES, draw_orientation_letters, draw_scale_bar
from SmartBiopsyLib.report.figures import (REGION_COLOURS, FigureStore, habitat_legend_handles, habitat_rgba,
                                           window_image, reslice)
from SmartBiopsyLib.report.html import esc, fmt_num, na_note, html_table


def _mean_sd(st) -> str:
    return f"{fmt_num(st.get('mean'))} ± {fmt_num(st.get('sd'))}" if isinstance(st, dict) and st else "-"


def _hit_cell(t: dict, planned: dict) -> str:
    """Hit probability of a target: at characterisation (no plan yet) and along its best planned path."""
    parts = []
    p, se = t.get("hit_probability"), t.get("hit_probability_se")
    if isinstance(p, (int, float)):
        parts.append(f"{100 * p:.0f}%" + (f" ± {100 * se:.1f}" if isinstance(se, (int, float)) else ""))
    hp = planned.get(t.get("region")) or planned.get(t.get("name"))
    if isinstance(hp, dict) and isinstance(hp.get("probability"), (int, float)):
        parts.append(f"planned path {100 * hp['probability']:.0f}% ± {100 * hp.get('standard_error', 0.0):.1f}")
    return "; ".join(parts) if parts else "-"


def _planned_hits(case: CaseFolder) -> dict:
    """{region or target: hit probability dict of its best-ranked trajectory} from plan/plan.json."""
    plan = case.json("plan/plan.json")
    out = {}
    for t in (plan or {}).get("trajectories", []) if isinstance(plan, dict) else []:
        if isinstance(t, dict) and isinstance(t.get("hit_probability"), dict) and t.get("rank") == 1:
            out[t.get("region") or t.get("target")] = t["hit_probability"]
    return out


def target_legend_handles() -> list:
    """Legend entry for the target crosses of the habitat figure."""
    try:
        from matplotlib.lines import Line2D
    except ImportError:
        return []
    return [Line2D([], [], linestyle="none", marker="+", ms=11, mew=2.5, color="black",
                   label="target (cross in its habitat's colour)")]


def draw_habitat_panel(ax, hab, base, centre, half: float, pts) -> None:
    """One axial panel (radiological: patient right on the image's left, anterior at the top) of the habitat
    label volume ``hab`` over ``base`` (grey, optional) centred on ``centre`` (RAS mm, MRI world), ``half`` mm
    each side, with the targets ``pts`` [(name, region, RAS point)] within 2.5 mm of the slice, orientation
    letters and a mm scale bar. Habitats are opaque and unsmoothed: each shows in exactly its palette colour."""
    u, v = (np.asarray(x, float) for x in VIEW_FRAMES["axial"])
    centre = np.asarray(centre, float)
    ext = (-half, half, half, -half)  # columns along u, rows along v, mm from the centre
    ax.set_facecolor("black")  # outside the MRI volume
    lab = reslice(hab, centre, u, v, half, half, 0.5, order=0)
    if base is not None:
        img = reslice(base, centre, u, v, half, half, 0.5, order=1)
        lo, hi = window_image(img)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=ext)
    ax.imshow(habitat_rgba(np.nan_to_num(lab).astype(int)), extent=ext, interpolation="nearest")
    shown = [(n, r, (np.asarray(q, float) - centre) @ u, (np.asarray(q, float) - centre) @ v) for n, r, q in pts
             if abs(np.asarray(q, float)[2] - centre[2]) <= 2.5]  # targets within this slab
    for other_name, other_region, x, y in shown:
        ax.plot([x], [y], marker="+", ms=16, mew=4.0, color="black")
        ax.plot([x], [y], marker="+", ms=13, mew=2.0, color=REGION_COLOURS.get(other_region, (0.5, 0.5, 0.5)))
        # the label goes to the side away from the nearest other target, so that labels do not overlap
        near = min(((ox - x, oy - y) for n, _, ox, oy in shown if n != other_name),
                   key=lambda dv: np.hypot(*dv), default=(-1.0, 1.0))
        dx, ha = (7, "left") if near[0] <= 0 else (-7, "right")
        dy = 5 if near[1] >= 0 else -14  # rows run downwards: a target further down keeps the label above
        ax.annotate(other_name, (x, y), xytext=(dx, dy), textcoords="offset points", color="white", ha=ha,
                    fontsize=9, fontweight="bold",
                    bbox={"boxstyle": "round,pad=0.1", "facecolor": "black", "alpha": 0.5, "linewidth": 0})
    ax.set_xlim(-half, half)
    ax.set_ylim(half, -half)
    ax.set_xticks([])
    ax.set_yticks([])
    draw_orientation_letters(ax, u, v)
    draw_scale_bar(ax)


def section_habitats(case: CaseFolder, figs: FigureStore) -> str:
    out = []
    hab = case.volume("characterisation/habitats.nrrd")
    t2 = case.volume("inputs/mri_t2.nrrd")
    targets = case.targets()
    if hab is None:
        out.append(na_note("Habitat map " + case.why("characterisation", "characterisation/habitats.nrrd")))
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
        ncol = min(len(pts), 3)
        nrow = (len(pts) + ncol - 1) // ncol
        fig = figs.new(3.6 * ncol, 3.7 * nrow + 0.9)
        for i, (name, region, p) in enumerate(pts):
            ax = fig.add_subplot(nrow, ncol, i + 1)
            draw_habitat_panel(ax, hab, base, p, half, pts)
            ax.set_title(f"{name}: axial S {p[2]:.1f} mm", fontsize=10)
        fig.legend(handles=habitat_legend_handles() + target_legend_handles(), loc="lower center", ncol=2,
                   fontsize=9, frameon=False)
        fig.suptitle(f"Habitats on {base_name} (axial, radiological: patient right on the image's left)",
                     fontsize=10)
        fig.tight_layout(rect=(0, 0.14 / nrow, 1, 1))
        out.append(figs.save(fig, "habitats_targets",
                             f"Habitat map over the {base_name} (MRI world), axial slice through each proposed "
                             "target (+), patient right on the image's left."))
    regions = case.csv("characterisation/regions.csv")
    if regions:
        rows = []
        for r in regions:
            ms = lambda k: f"{fmt_num(r.get(k + '_mean'))} ± {fmt_num(r.get(k + '_sd'))}"  # noqa: E731
            rows.append((r.get("region"), fmt_num(r.get("volume_ml"), 2), r.get("voxel_count", "-"), ms("adc"), ms("ef"),
                         ms("ff")))
        out.append(html_table(("region", "volume (ml)", "voxels", "ADC mean ± SD (10^-6 mm^2/s)", "EF mean ± SD (%)",
                           "FF mean ± SD (%)"), rows, num_cols=(1, 2)))
    else:
        out.append(na_note("Region table " + case.why("characterisation", "characterisation/regions.csv")))
    chars = case.json("characterisation/characterisation.json")
    missing = ((chars or {}).get("habitats") or {}).get("missing") if isinstance(chars, dict) else None
    for m in (missing or {}).values():
        out.append(f'<p class="note">{esc(m)}</p>')
    if targets:
        rows = []
        planned = _planned_hits(case)
        for t in targets:
            sig = t.get("signature") or {}
            sv = lambda k: _mean_sd(sig.get(k))  # noqa: E731
            ctp = case.target_ct(t)
            mrp = case.target_mri(t)
            rows.append((t.get("name"), t.get("region"), "-" if mrp is None else " ".join(fmt_num(v) for v in mrp),
                         "-" if ctp is None else " ".join(fmt_num(v) for v in ctp), fmt_num(t.get("depth_mm")),
                         "yes" if t.get("targetable", True) else "NO: " + "; ".join(t.get("reasons") or []),
                         _hit_cell(t, planned), sv("adc"), sv("ef"), sv("ff")))
        out.append(html_table(("target", "region", "MRI RAS (mm)", "CT RAS (mm)", "depth (mm)", "targetable",
                           "hit probability ± MC SE (%)", "ADC", "EF (%)", "FF (%)"), rows, num_cols=(4,)))
        defined = next((t for t in targets if t.get("hit_definition")), None)
        if defined is not None:
            model = defined.get("hit_model") or {}
            reg = (model.get("registration_error") or {}).get("source", "")
            out.append(f'<p class="note">Hit probability: {esc(defined["hit_definition"])}. Registration error: '
                       f'{esc(reg)}; needle lateral error {fmt_num(model.get("needle_lateral_rms_mm"))} mm RMS; '
                       f'direction at characterisation: {esc(model.get("direction_source", "-"))}; the planned-path '
                       f'value uses the best trajectory\'s direction. Monte Carlo with '
                       f'{model.get("n_samples", "-")} samples (seed {model.get("seed", "-")}).</p>')
    elif hab is not None:
        out.append(na_note("Targets " + case.why("characterisation", "characterisation/targets.json")))
    return "\n".join(out)

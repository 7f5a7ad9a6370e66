"""Report section: needle position and the notch ROI values on every map."""

from __future__ import annotations

import numpy as np

from SmartBiopsyCoreLib.display import draw_orientation_letters, draw_scale_bar
from SmartBiopsyLib.report.case import CaseFolder
from SmartBiopsyLib.report.figures import MAP_CMAPS, MAP_UNITS, FigureStore, apply_matrix, perp_axial, unit_vector, window_image, reslice
from SmartBiopsyLib.report.html import fmt_num, na_note, html_table


def sampling_not_done(case: CaseFolder) -> str | None:
    """"not done: ..." when the sampling step stopped (e.g. no confirmation CT for a target), else None."""
    st = case.stage_for("sampling")
    if st is not None and st.get("status") == "stopped":
        return f"not done: {(st.get('message') or 'no confirmation CT').strip()}"
    return None


def demo_simulated(case: CaseFolder) -> bool:
    """True when the sampling artefacts are the phantom demo's simulated confirmation CTs."""
    allv = case.json("sampling/notch_values.json")
    return bool(isinstance(allv, dict) and allv.get("simulated") is True) or any(
        d.name.endswith("_simulated") for d in case.sampling_dirs())


def _motion_rows(case: CaseFolder) -> list:
    rows = []
    for d in case.sampling_dirs():
        nd = case.json(f"sampling/{d.name}/needle.json")
        if not isinstance(nd, dict) or not isinstance(nd.get("patient_motion"), dict):
            continue
        mo, conf = nd["patient_motion"], nd.get("confirmation_ct") or {}
        corrected = ("yes (" + str(mo.get("method")) + ")") if mo.get("corrected") else (
            "no" if mo.get("checked") else "not checked")
        rows.append((d.name, str(conf.get("source", "")), str(conf.get("matched", "")),
                     fmt_num(mo.get("motion_mm")), fmt_num(mo.get("motion_at_target_mm")), fmt_num(mo.get("tolerance_mm")),
                     corrected, "; ".join(mo.get("warnings") or [])))
    return rows


def _notch_docs(case: CaseFolder) -> list[tuple[str, dict, dict | None]]:
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


def _notch_legend_handles() -> list:
    """Legend of the notch figure: the ROI outline and the needle axis (both drawn white on the maps)."""
    try:
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:  # no matplotlib: nothing is drawn
        return []
    return [Patch(facecolor="none", edgecolor="black", linewidth=1.5, label="notch ROI outline (sampled region)"),
            Line2D([], [], color="grey", lw=1.2, ls=":", label="needle axis")]


def section_notch(case: CaseFolder, figs: FigureStore) -> str:
    out = []
    stopped = sampling_not_done(case)
    if stopped:
        return na_note(f"Needle and notch values {stopped}")
    docs = _notch_docs(case)
    if not docs:
        return na_note("Notch ROIs " + case.why("sampling", "sampling/<target>/notch.json"))
    if demo_simulated(case):
        out.append('<p class="na">Simulated confirmation CTs (phantom demo): the needles were drawn into copies of '
                   "the planning CT; the positions and values below are simulated, not measured on a patient.</p>")
    motion = _motion_rows(case)
    if motion:
        out.append("<p>Patient motion between the planning CT and each confirmation CT (skin capsules):</p>")
        out.append(html_table(("target", "confirmation CT", "matched to target", "capsule motion (mm)",
                               "motion at target (mm)", "tolerance (mm)", "corrected", "warnings"), motion,
                              num_cols=(3, 4, 5)))
    needles = [(n, nd) for n, _, nd in docs if isinstance(nd, dict)]
    if needles:
        rows = [(n, fmt_num(nd.get("tip_error_mm")), fmt_num(nd.get("lateral_error_mm")), fmt_num(nd.get("depth_error_mm")),
                 fmt_num(nd.get("angle_deg")), fmt_num(nd.get("visible_length_mm")), "; ".join(nd.get("warnings") or []))
                for n, nd in needles]
        out.append("<p>Needle found in each confirmation CT, against the plan:</p>")
        out.append(html_table(("target", "tip error (mm)", "lateral (mm)", "depth (mm, + deeper)", "angle (deg)",
                           "visible length (mm)", "warnings"), rows, num_cols=(1, 2, 3, 4, 5)))
    maps = {k: case.volume(f"characterisation/{k}.nrrd") for k in ("adc", "ff", "ef")}
    maps = {k: v for k, v in maps.items() if v is not None}
    with_roi = [(n, d) for n, d, _ in docs if isinstance(d.get("roi"), dict)]
    if not maps:
        out.append(na_note("Notch crops " + case.why("characterisation", "characterisation/adc.nrrd")))
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
            axis_ct = unit_vector(roi["axis"])
            u_ct = unit_vector(roi.get("u_axis") or perp_axial(axis_ct))
            centre = apply_matrix(c2m, centre_ct)[0]
            a_m, u_m = unit_vector(c2m[:3, :3] @ axis_ct), unit_vector(c2m[:3, :3] @ u_ct)
            # as near the radiological axial view as the needle's plane allows (the ROI box is symmetric)
            a_m = -a_m if a_m[0] > 0 else a_m
            down = u_m[1] if abs(u_m[1]) >= abs(u_m[2]) else u_m[2]  # screen down towards posterior or inferior
            u_m = -u_m if down > 0 else u_m
            L = float(roi.get("length_mm", 10.0))
            hw = (roi.get("half_widths_mm") or [roi.get("radius_mm", 1.0)] * 2)[0]
            hs, hc = L / 2 + 12.0, 14.0
            for c, (mname, vol) in enumerate(maps.items()):
                ax = fig.add_subplot(len(with_roi), len(maps), r * len(maps) + c + 1)
                img = reslice(vol, centre, a_m, u_m, hs, hc, 0.25, order=0)
                lo, hi = window_image(img, 2, 98)
                im = ax.imshow(img, cmap=MAP_CMAPS.get(mname, "viridis"), vmin=lo, vmax=hi,
                               extent=(-hs, hs, hc, -hc))
                ax.plot([-L / 2, L / 2, L / 2, -L / 2, -L / 2], [-hw, -hw, hw, hw, -hw], color="white", lw=1.8)
                ax.plot([-L / 2, L / 2, L / 2, -L / 2, -L / 2], [-hw, -hw, hw, hw, -hw], color="black", lw=0.7)
                ax.axhline(0, color="white", lw=0.8, ls=":")
                st = (vals.get("maps") or {}).get(mname) or {}
                ax.set_title(f"{name} - {mname.upper()} mean {fmt_num(st.get('mean'))}", fontsize=9)
                ax.set_xlabel("along the needle (mm)", fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
                draw_orientation_letters(ax, a_m, u_m, fontsize=8)
                draw_scale_bar(ax, fontsize=8)
                cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
                cb.set_label(MAP_UNITS.get(mname, ""), fontsize=8)
        fig.legend(handles=_notch_legend_handles(), loc="lower center", ncol=2, fontsize=9, frameon=False)
        fig.suptitle("Notch ROI (box outline) on every map, on the map's own voxels (MRI world)", fontsize=10)
        fig.tight_layout(rect=(0, 0.08 / len(with_roi), 1, 1))
        out.append(figs.save(fig, "notch_rois", "Each map around the notch of each core, resliced on the plane of "
                                                "the needle axis; the outline is the sampled region."))
    rows = []
    for name, d, _ in docs:
        for mname, st in ((d.get("values") or {}).get("maps") or {}).items():
            rows.append((name, mname.upper(), st.get("units", MAP_UNITS.get(mname, "")), fmt_num(st.get("mean")),
                         fmt_num(st.get("median")), fmt_num(st.get("min")), fmt_num(st.get("max")), fmt_num(st.get("sd")),
                         fmt_num(st.get("coverage"), 2)))
    if rows:
        out.append(html_table(("target", "map", "units", "mean", "median", "min", "max", "SD", "coverage"), rows,
                          num_cols=(3, 4, 5, 6, 7, 8)))
    else:
        out.append(na_note("notch values not available (no map was sampled)"))
    return "\n".join(out)

"""Report section: CT-MRI fusion QA (capsule residuals, FRE, predicted TRE, fused pictures)."""

from __future__ import annotations

import numpy as np

from SmartBiopsyLib.report.case import CaseFolder
from SmartBiopsyLib.report.figures import FigureStore, apply_matrix
from SmartBiopsyLib.report.html import esc, fmt_num, na_note, html_table


def _fusion_point(case: CaseFolder, ct):
    pts = [p for p in (case.target_ct(t) for t in case.targets()) if p is not None]
    if pts:
        return np.mean(pts, axis=0), "the targets' centre"
    tum = case.volume("characterisation/tumour.nrrd")
    m = case.mri_to_ct()
    if tum is not None and m is not None and np.any(tum.array):
        c = tum.kji_to_ras_points(np.argwhere(tum.array != 0).mean(axis=0)[None])[0]
        return apply_matrix(m, c)[0], "the tumour centre"
    lo, hi = ct.bounds_ras()
    return 0.5 * (lo + hi), "the CT centre (no tumour or targets available)"


def section_fusion(case: CaseFolder, figs: FigureStore) -> str:
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
            from SmartBiopsyCoreLib.geometry import resample

            mr_on_ct = resample(t2, ct, case.mri_to_ct())
    if ct is None:
        out.append(na_note("Fused pictures " + case.why("inputs", "inputs/ct.nrrd")))
    elif mr_on_ct is None:
        out.append(na_note("Fused pictures " + case.why("fusion", "registration/t2_on_ct.nrrd")))
    elif not mr_on_ct.same_grid(ct):
        out.append(na_note("Fused pictures not available (registration/t2_on_ct.nrrd is not on the CT grid)"))
    elif figs.why_not:  # no matplotlib: say so where the pictures would be
        out.append(figs.not_drawn("fusion_checkerboard", "Checkerboard of the MRI resampled on the CT and the CT."))
        out.append(figs.not_drawn("fusion_overlay", "MRI over the CT."))
    else:
        from RegistrationFusionLib.registration.qa import write_fusion_pictures

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
        out.append(na_note("Registration QA " + case.why("fusion", "registration/fusion.json")))
        return "\n".join(out)
    passed = bool(qa_d.get("passed"))
    out.append(f'<p>Registration QA: <span class="{"pass" if passed else "fail"}">'
               f'{"PASSED" if passed else "FAILED"}</span>; FRE {fmt_num(qa_d.get("fre_mm"), 2)} mm.</p>')
    for f in qa_d.get("failures") or []:
        out.append(f'<p class="fail">{esc(f)}</p>')
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
        rows = [(lab, "yes" if u else "no", fmt_num(m.get("residual_mm"), 2), fmt_num(m.get("expected_residual_mm"), 2),
                 fmt_num(m.get("loo_mm"), 2)) for lab, u, m in zip(labels, used, markers)]
        out.append(html_table(("marker", "used", "residual (mm)", "expected (mm)", "leave-one-out (mm)"), rows,
                          num_cols=(2, 3, 4)))
    else:
        out.append(na_note("per-marker residuals not available (the QA report lists no markers)"))
    tgts = [t for t in (qa_d.get("targets") or []) if isinstance(t, dict)]
    if tgts:
        rows = [(t.get("name"), fmt_num(t.get("predicted_error_p95_mm"), 2), fmt_num(t.get("predicted_tre_mm"), 2),
                 fmt_num(t.get("predicted_tre_fwm_mm"), 2), fmt_num(t.get("refinement_displacement_mm"), 2),
                 " ".join(fmt_num(v) for v in (t.get("ras") or []))) for t in tgts]
        out.append("<p>Predicted registration error at each target: the 95th percentile with unmodelled deformation, "
                   "and the capsules' own TRE (RMS), which does not include it:</p>")
        out.append(html_table(("target", "predicted error, 95th percentile (mm)", "predicted TRE (mm)",
                               "TRE, FLE-weighted (mm)", "moved by refinement (mm)", "CT RAS (mm)"), rows,
                              num_cols=(1, 2, 3, 4)))
    else:
        out.append(na_note("predicted TRE at the targets not available (the QA was computed without targets)"))
    out.extend(_error_model_block(qa_d))
    notes = qa_d.get("notes") or []
    if notes:
        out.append('<p class="note">' + "<br>".join(esc(n) for n in notes if n) + "</p>")
    return "\n".join(out)


def _error_model_block(qa_d: dict) -> list:
    """The predicted 95th-percentile error at each target against its targetable depth (qa.json ``error_model``)."""
    em = qa_d.get("error_model")
    if not isinstance(em, dict):
        return []
    depths = qa_d.get("targetable_depth_mm") or {}
    rows = []
    for t in em.get("targets") or []:
        if not isinstance(t, dict):
            continue
        depth = depths.get(t.get("name"))
        ok = depth is not None and t.get("p95_mm") is not None and float(t["p95_mm"]) <= float(depth)
        rows.append((t.get("name"), fmt_num(t.get("rigid_tre_rms_mm"), 2), fmt_num(t.get("deformation_mm"), 2),
                     fmt_num(t.get("p95_mm"), 2), fmt_num(depth, 1), "ok" if ok else "FAIL"))
    if not rows:
        return []
    return ["<p>Predicted registration error including unmodelled soft-tissue deformation (95th percentile; "
            f"{esc(str(em.get('formula', '')))}). A target fails when it exceeds the targetable depth "
            "(depth in the habitat - needle error - half notch):</p>",
            html_table(("target", "capsule TRE RMS (mm)", "deformation (mm)", "predicted 95th pct (mm)",
                        "targetable depth (mm)", "QA"), rows, num_cols=(1, 2, 3, 4))]

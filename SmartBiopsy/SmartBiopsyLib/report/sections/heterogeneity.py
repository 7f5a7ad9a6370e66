"""Report section: heterogeneity between the sampled sites."""

from __future__ import annotations

import numpy as np

from SmartBiopsyLib.report.case import CaseFolder
from SmartBiopsyLib.report.figures import REGION_COLOURS, FigureStore
from SmartBiopsyLib.report.html import fmt_num, na_note, html_table
from SmartBiopsyLib.report.sections.specimens import _pathology


def section_heterogeneity(case: CaseFolder, figs: FigureStore) -> str:
    from SmartBiopsyLib.report.sections.notch import sampling_not_done

    stopped = sampling_not_done(case)
    if stopped:
        return na_note(f"Heterogeneity {stopped}")
    path = _pathology(case)
    if not path:
        why = case.problems.get("specimens/pathology.csv")
        if why:
            return na_note(f"not available ({why})")
        st = case.stage_for("specimens")
        if (st is not None and st.get("status") != "done") or (st is None and case.first_failed() is not None):
            return na_note(case.why("specimens", "specimens/pathology.csv"))
        return na_note("not available (no pathology results: specimens/pathology.csv is absent)")
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
        return na_note("not available (no specimen has both an ADC value and a Ki-67 result)")
    synthetic = bool((case.summary.get("case") or {}).get("synthetic"))
    label = "simulated pathology (phantom demo)" if synthetic else "pathology"
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
    trows = [("ADC (10^-6 mm^2/s)", fmt_num(adcs.min(), 0), fmt_num(adcs.max(), 0), fmt_num(adcs.max() - adcs.min(), 0),
              "-" if tumour_adc is None else f"{np.percentile(tumour_adc, 5):.0f}-{np.percentile(tumour_adc, 95):.0f}"),
             (f"Ki-67 (%) - {label}", fmt_num(kis.min()), fmt_num(kis.max()), fmt_num(kis.max() - kis.min()), "-")]
    out.append(html_table(("quantity", "min over sites", "max over sites", "range", "whole tumour 5-95 %"), trows,
                      num_cols=(1, 2, 3)))
    if synthetic:
        out.append('<p class="note">The pathology values of this case are simulated (phantom demo); they show the '
                   "layout of the analysis, not a biological result.</p>")
    return "\n".join(out)

"""Report section: the procedure timeline (events, dose)."""

from __future__ import annotations

import datetime as _dt

import numpy as np

from SmartBiopsyLib.report.case import CaseFolder
from SmartBiopsyLib.report.figures import FigureStore
from SmartBiopsyLib.report.html import esc, fmt_num, na_note, html_table
from SmartBiopsyLib.report.words import plain


def draw_dose_timeline(ax, mins, dlp, labels, window_min: float):
    """The dose timeline on ``ax``: one bar per CT acquisition (DLP, mGy*cm) at its time (minutes since the
    planning topogram), the cumulative DLP on a second axis, the procedure window, each scan's name above the
    plot at its time (never over a bar) and the legend below the plot (never over the cumulative line). Returns the second
    (cumulative) axes."""
    mins = np.asarray(mins, float)
    dlp = np.asarray(dlp, float)
    width = max(0.6, 0.012 * max(float(mins.max(initial=0.0)), 1.0))
    ax.bar(mins, dlp, width=width, color="#0072b2", label="DLP per scan")
    ax2 = ax.twinx()
    cum = np.concatenate([[0.0], np.cumsum(dlp)])
    ax2.step(np.concatenate([[0.0], mins]), cum, where="post", color="#d55e00", lw=1.8, label="cumulative DLP")
    ax.axvline(window_min, color="#e69f00", ls="--", label=f"{window_min:.0f} min window")
    top = ax.secondary_xaxis("top")  # each scan's name above the plot, at its time: clear of bars and line
    top.set_xticks(mins, labels=list(labels), rotation=90, fontsize=8)
    ax.set_ylim(0, float(dlp.max(initial=1.0) or 1.0) * 1.1)
    ax2.set_ylim(0, float(cum[-1] or 1.0) * 1.1)
    ax.set_xlim(-1, max(window_min, float(mins.max(initial=0.0))) + 3)
    ax.set_xlabel("minutes since the planning topogram")
    ax.set_ylabel("DLP per scan (mGy*cm)")
    ax2.set_ylabel("cumulative DLP (mGy*cm)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.24), ncol=3, frameon=False)
    return ax2


def section_procedure(case: CaseFolder, figs: FigureStore) -> str:
    out = []
    proc = case.json("specimens/procedure.json")
    if isinstance(proc, dict):
        scans = [s for s in proc.get("scans") or [] if isinstance(s, dict)]
        if (case.summary.get("case") or {}).get("synthetic") and "(simulated)" in str(proc):
            out.append('<p class="na">Simulated procedure record (phantom demo): the times, doses and needle '
                       "manipulations below are simulated.</p>")
        out.append(html_table(("item", "value"), [
            ("participant", proc.get("participant_id") or "-"), ("operator", proc.get("operator") or "-"),
            ("planning topogram", proc.get("planning_topogram_utc") or "-"),
            ("CT acquisitions", len(scans)), ("total DLP", f"{fmt_num(proc.get('total_dlp_mgy_cm'))} mGy*cm"),
            ("elapsed", f"{fmt_num(proc.get('elapsed_min'))} min (window {fmt_num(proc.get('window_min'), 0)} min"
                        + (", EXCEEDED)" if proc.get("window_exceeded") else ")")),
            ("needle manipulations", ", ".join(f"{k} {v}" for k, v in (proc.get("manipulations") or {}).items())
             + f" (total {proc.get('total_manipulations', '-')})"),
            ("adverse events", "; ".join(f"{a.get('term')} grade {a.get('grade')}"
                                         for a in proc.get("adverse_events") or []) or "none")]))
        if scans:
            out.append(html_table(("CT acquisition", "time (UTC)", "DLP (mGy*cm)"),
                              [(s.get("label"), s.get("time_utc"), fmt_num(s.get("dlp_mgy_cm"))) for s in scans],
                              num_cols=(2,)))
            t0 = proc.get("planning_topogram_utc") or scans[0].get("time_utc")
            try:
                t0d = _dt.datetime.fromisoformat(str(t0).replace("Z", "+00:00"))
                mins = [(_dt.datetime.fromisoformat(str(s["time_utc"]).replace("Z", "+00:00")) - t0d).total_seconds()
                        / 60.0 for s in scans]
                dlp = np.array([float(s.get("dlp_mgy_cm") or 0.0) for s in scans])
                fig = figs.new(8, 4.2)
                ax = fig.add_subplot(111)
                draw_dose_timeline(ax, mins, dlp, [str(s.get("label")) for s in scans],
                                   float(proc.get("window_min") or 60.0))
                ax.set_title("CT acquisitions over the procedure")
                fig.tight_layout()
                out.append(figs.save(fig, "procedure_timeline", "Dose-length product of each CT acquisition over "
                                                                "time, cumulative dose and the procedure window."))
            except (KeyError, TypeError, ValueError) as exc:
                out.append(f'<p class="note">timeline not drawn: {esc(exc)}</p>')
    else:
        out.append(na_note("Procedure log " + case.why("specimens", "specimens/procedure.json")))
    out.append(_calibration(case, figs))
    sess = case.json("robot/session.json")
    if isinstance(sess, dict):
        out.append(f"<p>Robot session: {'completed' if sess.get('completed') else 'NOT completed'}"
                   f"{' (cancelled)' if sess.get('cancelled') else ''}.</p>")
        if sess.get("auto_confirmed") or (case.summary.get("case") or {}).get("auto_confirmed"):
            out.append('<p class="note">Demo: the plan was confirmed automatically and the robot was a simulator.</p>')
        # the robot's STATUS text is its reply when the target was sent ("target 1 reachable"); the state is
        # where the target ended ("reached"): the columns say which is which
        rows = [(t.get("name"), t.get("region"), plain(t.get("state")), t.get("transmissions"),
                 fmt_num(t.get("echo_error_mm"), 3),
                 fmt_num(t.get("echo_error_deg"), 3), fmt_num(t.get("reached_error_mm"), 2), t.get("robot_status") or "-")
                for t in sess.get("targets") or [] if isinstance(t, dict)]
        out.append(html_table(("target", "region", "final state", "sent", "echo error (mm)", "echo error (deg)",
                           "reached error (mm)", "robot's reply when the target was sent"), rows,
                              num_cols=(3, 4, 5, 6)))
    else:
        out.append(na_note("Robot session " + case.why("robot", "robot/session.json")))
    return "\n".join(out)


def _calibration(case: CaseFolder, figs: FigureStore) -> str:
    """The robot-to-CT calibration computed from the robot's fiducial frame in the planning CT."""
    qa = case.json("robot/calibration/calibration_qa.json")
    if not isinstance(qa, dict):
        return na_note("Robot calibration " + case.why("robot", "robot/calibration/calibration_qa.json"))
    truth = case.json("robot/calibration/truth_check.json")
    model = qa.get("model", "-")
    if isinstance(model, dict):  # the frame model itself: its name, not its JSON
        model = model.get("name") or "-"
    rows = [("fiducial frame", model), ("fiducials found", qa.get("fiducials_found", "-")),
            ("residual RMS (mm)", fmt_num(qa.get("residual_rms_mm"), 3)),
            ("worst fiducial residual (mm)", fmt_num(max((qa.get("residual_mm_per_fiducial") or {}).values(), default=None), 3)),
            ("predicted error at targets, 95 % (mm)",
             ", ".join(f"{k} {fmt_num(v, 2)}" for k, v in (qa.get("predicted_error_p95_mm_at_targets") or {}).items()) or "-"),
            ("QA", "PASSED" if qa.get("passed") is True else "FAILED")]
    if isinstance(truth, dict) and truth.get("frame_centre_error_mm") is not None:
        rows.append(("error against the simulated truth (mm)", fmt_num(truth["frame_centre_error_mm"], 3)))
    parts = ["<p>Robot-to-CT calibration from the robot's fiducial frame in the planning CT:</p>",
             html_table(("quantity", "value"), rows)]
    png = case.root / "robot" / "calibration" / "calibration.png"
    if png.is_file():
        parts.append(figs.embed_file(png, "robot_calibration", "Maximum-intensity projections around the robot's "
                                     "fiducial frame with the fitted model and each fiducial's residual."))
    return "\n".join(parts)

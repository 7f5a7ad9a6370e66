"""Enhancement from a DCE stored as separate series: tissue from the enhanced signal, baseline before the
bolus, peak or chosen post frame, both stated; the low-signal tissue that enhances is kept."""
from __future__ import annotations

import numpy as np
import pytest

from SmartBiopsyCoreLib.dataio import imageio
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyLib.characterise import maps

from SmartBiopsyCoreLib.phantom.dce import DARK_POST, DARK_PRE, dce_frames, tissues, write_dce

TRUE_EF = 100.0 * (DARK_POST - DARK_PRE) / DARK_PRE   # 400 %


def test_dark_tissue_that_enhances_is_inside_the_ef_map():
    """Pre-contrast Otsu dropped it (EF valid in 6 % of a real prostate); the post/maximum signal keeps it."""
    frames, _ = dce_frames()
    dark, _ = tissues()
    ef = maps.compute_ef(frames[0], frames[-1])
    valid = np.isfinite(ef.array[dark]).mean()
    print(f"EF valid in {valid:.1%} of the enhancing dark tissue")
    assert valid >= 0.98
    assert np.nanmedian(ef.array[dark]) == pytest.approx(TRUE_EF, rel=0.1)


def test_dce_written_as_separate_series_gives_ef_with_stated_baseline_and_peak(tmp_path):
    write_dce(str(tmp_path / "dce"), n_frames=8, arrival=3)
    intake = imageio.load_study_intake(tmp_path)
    ts = intake.time_series["t1_vibe_dyn_DCE"]
    ef = maps.compute_ef_dynamic(ts.frames, ts.times_s)
    d = ef.meta["dynamic"]
    assert d["baseline_frames"] == [0, 1, 2] and d["baseline_choice"] == "automatic"
    assert d["bolus_arrival_s"] == pytest.approx(18.0)
    assert d["post_choice"] == "peak" and d["post_frame"] >= 4
    assert "baseline frames 1-3" in ef.meta["dynamic_sentence"] and "peak" in ef.meta["dynamic_sentence"]
    dark, bright = tissues()
    assert np.isfinite(ef.array[dark]).mean() >= 0.98
    assert np.nanmedian(ef.array[dark]) == pytest.approx(TRUE_EF, rel=0.1)
    assert abs(np.nanmedian(ef.array[bright])) < 3.0


def test_chosen_post_time_and_baseline_are_used_and_stated():
    frames, times = dce_frames(n_frames=8, arrival=3)
    ef = maps.compute_ef_dynamic(frames, times, post_time_s=17.0)
    assert ef.meta["dynamic"]["post_frame"] == 3 and ef.meta["dynamic"]["post_choice"] == "chosen"
    # frame 3 (18 s) is half-way up the rise: EF half of the full enhancement
    dark, _ = tissues()
    assert np.nanmedian(ef.array[dark]) == pytest.approx(TRUE_EF / 2, rel=0.12)
    ef2 = maps.compute_ef_dynamic(frames, times, baseline_frames=2)
    assert ef2.meta["dynamic"]["baseline_frames"] == [0, 1] and ef2.meta["dynamic"]["baseline_choice"] == "chosen"
    with pytest.raises(InputDataError, match="falls in the baseline"):
        maps.compute_ef_dynamic(frames, times, post_time_s=6.0)


def test_late_bolus_moves_the_baseline():
    frames, times = dce_frames(n_frames=10, arrival=6)
    d = maps.compute_ef_dynamic(frames, times).meta["dynamic"]
    assert d["baseline_frames"] == list(range(6))


def test_series_without_enhancement_is_refused_with_a_sentence():
    frames, times = dce_frames(n_frames=6, arrival=99)
    with pytest.raises(InputDataError, match="no contrast enhancement"):
        maps.compute_ef_dynamic(frames, times)

"""Real study folders as a user hands them over: ``run --case`` and ``characterise`` with localizers,
symlinked series, maps on other grids of the same session, other frames of reference and a DCE folder.

The ADC acceptance is measured on PROSTATEx-0000 through the default product path (no method option).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from SmartBiopsyCoreLib.dataio import dicomio, imageio
from SmartBiopsyCoreLib.dataio.transforms import write_transform_json
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyLib.characterise import maps

from test_cli_foundation import assert_clean_error, smartbiopsy

COR = np.column_stack([[1, 0, 0], [0, 0, -1], [0, 1, 0]]).astype(float)
SAG = np.column_stack([[0, 1, 0], [0, 0, -1], [-1, 0, 0]]).astype(float)


def write_localizer(out_dir, frame="1.2.3.4.5"):
    """A three-orientation localizer: ONE series with an axial, a coronal and a sagittal image."""
    uid = "1.2.826.0.1.3680043.9.7777.2"
    for n, rot in enumerate((np.eye(3), COR, SAG)):
        m = make_grid([-60.0, -60.0, 0.0], [4.0, 4.0, 5.0], (1, 32, 32), rot)
        dicomio.write_dicom_series(RasVolume(np.full((1, 32, 32), 200.0, np.float32), m, "loc", {}), out_dir,
                                   modality="MR", series_description="t1_fl2d_3orient", series_number=1,
                                   series_uid=uid, frame_of_reference_uid=frame, file_prefix=f"LOC{n}_")


def simulated_ct_around(vol: RasVolume) -> RasVolume:
    """A simulated CT (water body with a bone rod in air) covering ``vol``'s field of view, for the test."""
    lo, hi = vol.bounds_ras()
    c = 0.5 * (lo + hi)
    shape, sp = (60, 128, 128), 2.5
    m = make_grid(list(c - np.array([64 * sp, 64 * sp, 30 * sp])), [sp, sp, sp], shape)
    zz, yy, xx = np.indices(shape)
    ct = np.where(((xx - 64) / 55.0) ** 2 + ((yy - 64) / 40.0) ** 2 <= 1, 40, -1000).astype(np.int16)
    ct[((xx - 64) / 8.0) ** 2 + ((yy - 90) / 8.0) ** 2 <= 1] = 700
    return RasVolume(ct, m, "ct", {"modality": "CT"})


@pytest.fixture(scope="module")
def prostatex_study(shared_data, tmp_path_factory):
    """A study folder: the real PROSTATEx series reached through symbolic links (never copied), a
    three-orientation localizer, a simulated CT and a tumour box drawn on the T2 grid; an EF map on the
    T2 grid (same frame of reference as the DWI) and an identity MRI->CT transform next to it."""
    src = shared_data / "prostatex-0000"
    if not (src / "dwi").is_dir():
        pytest.skip("PROSTATEx not available")
    tmp = tmp_path_factory.mktemp("prostatex_case")
    root = tmp / "case"
    root.mkdir()
    for n in ("dwi", "t2_tra", "adc_scanner"):
        os.symlink(src / n, root / n, target_is_directory=True)
    write_localizer(root / "localizer")
    t2 = imageio.load_image(src / "t2_tra")
    frame = t2.meta["frame_of_reference_uid"]
    sh = t2.array.shape
    tum = np.zeros(sh, np.uint8)
    tum[sh[0] // 2 - 3: sh[0] // 2 + 3, 160:224, 160:224] = 1
    imageio.save_image(RasVolume(tum, t2.ijk_to_ras, "tumour", {"frame_of_reference_uid": frame}), root / "tumour.nrrd")
    ef = np.where(np.arange(sh[2])[None, None, :] < 192, 120.0, 30.0) * np.ones(sh)
    imageio.save_image(RasVolume(ef.astype(np.float32), t2.ijk_to_ras, "ef", {"frame_of_reference_uid": frame}),
                       tmp / "ef_t2grid.nrrd")
    imageio.save_image(simulated_ct_around(t2), root / "ct.nrrd")
    write_transform_json(tmp / "identity.json", np.eye(4), "test: the simulated CT is built in the MRI world")
    return tmp


def _scanner_agreement(adc_path, shared_data):
    dwi = dicomio.load_dwi_series(shared_data / "prostatex-0000" / "dwi")
    scanner = dicomio.load_dicom_series(shared_data / "prostatex-0000" / "adc_scanner")
    adc = imageio.load_image(adc_path)
    assert adc.same_grid(scanner, tol=1e-3)
    body = maps.signal_mask(dwi[min(dwi)])
    a, o = np.asarray(scanner.array, float), np.asarray(adc.array, float)
    sel = body & np.isfinite(o) & (a > 0)
    r = float(np.corrcoef(o[sel], a[sel])[0, 1])
    med = float(np.median(np.abs(o[sel] - a[sel]) / a[sel]))
    nan = float(np.isnan(o[body]).mean())
    print(f"{adc_path}: r={r:.4f} median |rel diff|={med:.2%} NaN {nan:.2%} of signal voxels")
    return r, med, nan


def test_run_case_with_localizer_and_symlinked_series_uses_default_adc_fit(prostatex_study, shared_data):
    out = prostatex_study / "run_out"
    proc = smartbiopsy("run", "--case", prostatex_study / "case", "--ef", prostatex_study / "ef_t2grid.nrrd",
                       "--transform", prostatex_study / "identity.json", "--out", out, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["load"]["status"] == "done" and stages["characterise"]["status"] == "done", proc.stderr[-2000:]
    # which series were used for what, and which were skipped, printed and written
    assert "skipped      't1_fl2d_3orient'" in proc.stdout and "orientations" in proc.stdout
    assert "dwi          'ep2d_diff_tra_DYNDIST' (series 6) b = 50/400/800" in proc.stdout
    used = json.loads((out / "inputs" / "series_used.json").read_text())
    assert set(used["used"]) == {"ct", "t2", "dwi", "tumour"} and summary["intake"] == used
    assert "scanner ADC map" in used["not_used"][0]["reason"]
    r, med, nan = _scanner_agreement(out / "characterisation" / "adc.nrrd", shared_data)
    assert r >= 0.99 and med <= 0.05 and nan <= 0.02
    qc = json.loads((out / "characterisation" / "adc_qc.json").read_text())
    assert qc["method"] == "ols" and qc["nan_percent_of_signal_voxels"] <= 2.0
    assert "EF resampled (same frame of reference) onto the ADC grid" in proc.stdout


def test_run_case_that_stops_at_load_still_writes_summary_and_intake(tmp_path):
    case = tmp_path / "case"
    write_localizer(case / "localizer")
    m = make_grid([-20.0, -20.0, -10.0], [1.0, 1.0, 3.0], (6, 40, 40))
    dicomio.write_dicom_series(RasVolume(np.full((6, 40, 40), 300.0, np.float32), m, "t2", {}), case / "t2",
                               modality="MR", series_description="t2_tse_tra", series_number=3)
    out = tmp_path / "out"
    proc = smartbiopsy("run", "--case", case, "--out", out)
    assert_clean_error(proc, "no planning CT")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"][0]["status"] == "failed" and "planning CT" in summary["stages"][0]["message"]
    assert summary["intake"]["used"] == {"t2": "'t2_tse_tra' (series 3)"}
    assert "orientations" in summary["intake"]["skipped"][0]["reason"]
    assert (out / "inputs" / "series_used.json").is_file()


def test_characterise_resamples_maps_of_the_same_session_onto_the_adc_grid(prostatex_study, shared_data):
    out = prostatex_study / "char_out"
    proc = smartbiopsy("characterise", "--dwi", shared_data / "prostatex-0000" / "dwi",
                       "--tumour", prostatex_study / "case" / "tumour.nrrd", "--ef", prostatex_study / "ef_t2grid.nrrd",
                       "--out", out, "--no-radiomics")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: ef resampled (same frame of reference)" in proc.stdout
    assert "note: tumour resampled (same frame of reference)" in proc.stdout
    r, med, nan = _scanner_agreement(out / "adc.nrrd", shared_data)
    assert r >= 0.99 and med <= 0.05 and nan <= 0.02
    grids = json.loads((out / "characterisation.json").read_text())["grids"]
    assert grids["ef"].startswith("resampled") and imageio.load_image(out / "ef.nrrd").same_grid(
        imageio.load_image(out / "adc.nrrd"))


def _small_session(tmp_path, ef_frame):
    """Synthetic DWI (b 0/800, frame F) and an EF map on another grid with frame ``ef_frame`` (None: unknown)."""
    frame = "1.2.3.4.99"
    shape = (8, 30, 30)
    m = make_grid([-22.5, -22.5, -12.0], [1.5, 1.5, 3.0], shape)
    body = np.zeros(shape, bool)
    body[1:7, 3:27, 3:27] = True
    dwi = {b: RasVolume(np.where(body, 800 * np.exp(-b * 1.2e-3), 0).astype(np.float32), m, f"b{b}", {})
           for b in (0.0, 800.0)}
    dicomio.write_dwi_series(dwi, tmp_path / "dwi", frame_of_reference_uid=frame)
    tum = np.zeros(shape, np.uint8)
    tum[2:6, 8:22, 8:22] = 1
    imageio.save_image(RasVolume(tum, m, "tumour", {"frame_of_reference_uid": frame}), tmp_path / "tumour.nrrd")
    m2 = make_grid([-24.0, -24.0, -12.0], [1.0, 1.0, 2.0], (12, 48, 48))
    meta = {} if ef_frame is None else {"frame_of_reference_uid": ef_frame}
    imageio.save_image(RasVolume(np.full((12, 48, 48), 50.0, np.float32), m2, "ef", meta), tmp_path / "ef.nrrd")
    write_transform_json(tmp_path / "identity.json", np.eye(4), "test")
    return frame


@pytest.mark.parametrize("other", ["1.2.3.4.other", None])
def test_characterise_refuses_map_of_another_or_unknown_frame_without_transform(tmp_path, other):
    _small_session(tmp_path, other)
    args = ["characterise", "--dwi", tmp_path / "dwi", "--tumour", tmp_path / "tumour.nrrd", "--ef",
            tmp_path / "ef.nrrd", "--no-radiomics"]
    proc = smartbiopsy(*args, "--out", tmp_path / "o1")
    assert_clean_error(proc, "'ef'", "transform")
    proc = smartbiopsy(*args, "--transform", f"ef={tmp_path / 'identity.json'}", "--out", tmp_path / "o2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: ef resampled with the given transform" in proc.stdout


def test_characterise_takes_a_dce_folder_and_states_baseline_and_post(tmp_path):
    from SmartBiopsyCoreLib.phantom.dce import SHAPE, dce_frames, write_dce

    frame = "1.2.3.4.5"
    frames, _ = dce_frames()
    m = frames[0].ijk_to_ras
    body = frames[0].array > 15
    dwi = {b: RasVolume(np.where(body, 800 * np.exp(-b * 1.2e-3), 0).astype(np.float32), m, f"b{b}", {})
           for b in (0.0, 800.0)}
    dicomio.write_dwi_series(dwi, tmp_path / "dwi", frame_of_reference_uid=frame)
    write_dce(str(tmp_path / "dce"), frame=frame)
    tum = np.zeros(SHAPE, np.uint8)
    tum[1:5, 3:12, 4:16] = 1
    imageio.save_image(RasVolume(tum, m, "tumour", {"frame_of_reference_uid": frame}), tmp_path / "tumour.nrrd")
    proc = smartbiopsy("characterise", "--dwi", tmp_path / "dwi", "--dce", tmp_path / "dce", "--tumour",
                       tmp_path / "tumour.nrrd", "--out", tmp_path / "out", "--no-radiomics")
    assert "baseline frames 1-3" in proc.stdout and "peak enhancement" in proc.stdout, proc.stderr[-2000:]
    qc = json.loads((tmp_path / "out" / "ef_qc.json").read_text())
    assert qc["dynamic"]["baseline_frames"] == [0, 1, 2] and qc["dynamic"]["post_choice"] == "peak"


def test_load_lists_time_series_and_skipped_series(tmp_path):
    from SmartBiopsyCoreLib.phantom.dce import write_dce

    write_localizer(tmp_path / "study" / "localizer")
    write_dce(str(tmp_path / "study" / "dce"), n_frames=5, arrival=2)
    proc = smartbiopsy("load", tmp_path / "study", "--json", "--mrb", tmp_path / "s.mrb")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert doc["volumes"] == [] and len(doc["time_series"]) == 1
    ts = doc["time_series"][0]
    assert ts["kind"] == "DCE" and ts["n_frames"] == 5 and ts["times_s"] == [0.0, 6.0, 12.0, 18.0, 24.0]
    assert ts["sequence_node"].startswith("t1_vibe_dyn_DCE")
    assert "orientations" in doc["skipped"][0]["reason"]
    assert (tmp_path / "s.mrb").stat().st_size > 0


def test_run_takes_a_dce_folder_and_says_which_frames_made_the_ef(tmp_path):
    from SmartBiopsyCoreLib.phantom.dce import SHAPE, dce_frames, write_dce

    frame = "1.2.3.4.5"
    frames, _ = dce_frames()
    m = frames[0].ijk_to_ras
    body = frames[0].array > 15
    dwi = {b: RasVolume(np.where(body, 800 * np.exp(-b * 1.2e-3), 0).astype(np.float32), m, f"b{b}", {})
           for b in (0.0, 800.0)}
    dicomio.write_dwi_series(dwi, tmp_path / "dwi", frame_of_reference_uid=frame)
    write_dce(str(tmp_path / "dce"), frame=frame)
    tum = np.zeros(SHAPE, np.uint8)
    tum[1:5, 3:12, 4:16] = 1
    imageio.save_image(RasVolume(tum, m, "tumour", {"frame_of_reference_uid": frame}), tmp_path / "tumour.nrrd")
    imageio.save_image(simulated_ct_around(frames[0]), tmp_path / "ct.nrrd")
    write_transform_json(tmp_path / "identity.json", np.eye(4), "test: the simulated CT is built in the MRI world")
    out = tmp_path / "out"
    proc = smartbiopsy("run", "--ct", tmp_path / "ct.nrrd", "--dwi", tmp_path / "dwi", "--dce", tmp_path / "dce",
                       "--tumour", tmp_path / "tumour.nrrd", "--transform", tmp_path / "identity.json", "--out", out,
                       timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["characterise"]["status"] == "done", proc.stderr[-2000:]
    assert "a DCE of 8 frames" in stages["load"]["message"]
    assert any("EF from the DCE: baseline frames 1-3" in line for line in summary["lines"])
    qc = json.loads((out / "characterisation" / "ef_qc.json").read_text())
    assert qc["dynamic"]["bolus_arrival_s"] == 18.0 and qc["dynamic"]["post_choice"] == "peak"

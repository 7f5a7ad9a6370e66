"""Study intake: a whole study folder with localizers, scouts, screenshots, symlinked series and a DCE
stored as one series per frame loads; what cannot be used is listed with its reason and skipped."""
from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pytest

from SmartBiopsyCoreLib.dataio import dicomio, imageio
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid

from SmartBiopsyCoreLib.phantom.dce import write_dce

T0 = dt.datetime(2024, 3, 1, 10, 0, 0)
AX = np.eye(3)
COR = np.column_stack([[1, 0, 0], [0, 0, -1], [0, 1, 0]]).astype(float)   # i->R, j->I, k->A
SAG = np.column_stack([[0, 1, 0], [0, 0, -1], [-1, 0, 0]]).astype(float)  # i->A, j->I, k->L


def _vol(shape=(6, 16, 16), rot=AX, value=100.0, name="v", seed=0):
    rng = np.random.default_rng(seed)
    m = make_grid([-12.0, -12.0, -9.0], [1.5, 1.5, 3.0], shape, rot)
    return RasVolume((value + rng.normal(0, 5, shape)).clip(0).astype(np.float32), m, name, {})


def write_three_orientation_localizer(out_dir, description="t1_fl2d_3orient", frame="1.2.3.4.5"):
    """ONE series holding an axial, a coronal and a sagittal image (as scanners write their localizer)."""
    uid = "1.2.826.0.1.3680043.9.7777.1"
    for n, rot in enumerate((AX, COR, SAG)):
        dicomio.write_dicom_series(_vol((1, 16, 16), rot), out_dir, modality="MR", series_description=description,
                                   series_number=1, series_uid=uid, frame_of_reference_uid=frame,
                                   file_prefix=f"LOC{n}_")


def build_study(root, outside):
    """A study folder: localizer (3 orientations), named scout, screenshot-like single image, T2, a DCE,
    a VFA set, and a T2 series reached through a symbolic link to a folder outside the study."""
    frame = "1.2.3.4.5"
    write_three_orientation_localizer(root / "01_loc", frame=frame)
    dicomio.write_dicom_series(_vol((3, 16, 16)), root / "02_scout", modality="MR", series_description="AAHead_Scout",
                               series_number=2, frame_of_reference_uid=frame)
    dicomio.write_dicom_series(_vol((1, 16, 16)), root / "03_single", modality="MR", series_description="PhoenixZIPReport",
                               series_number=99, frame_of_reference_uid=frame)
    dicomio.write_dicom_series(_vol(), root / "04_t2", modality="MR", series_description="t2_tse_tra", series_number=4,
                               frame_of_reference_uid=frame)
    write_dce(str(root / "05_dce"), frame=frame)
    for n, fa in enumerate((2.0, 5.0, 10.0, 15.0)):
        dicomio.write_dicom_series(_vol(value=50 + 10 * fa, seed=n), root / f"06_vfa_{n}", modality="MR",
                                   series_description="t1_vibe_vfa", series_number=30 + n,
                                   frame_of_reference_uid=frame, flip_angle=fa,
                                   acquisition_datetime=T0 - dt.timedelta(minutes=5, seconds=-20 * n))
    dicomio.write_dicom_series(_vol(value=300.0), outside / "t2_cor_series", modality="MR",
                               series_description="t2_tse_cor", series_number=5, frame_of_reference_uid=frame)
    os.symlink(outside / "t2_cor_series", root / "07_linked_t2_cor", target_is_directory=True)


def test_study_with_localizer_scout_and_symlinked_series_loads(tmp_path):
    root, outside = tmp_path / "study", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    build_study(root, outside)
    intake = imageio.load_study_intake(root)
    assert set(intake.volumes) == {"t2_tse_tra", "t2_tse_cor"}
    skipped = {s.label: s.reason for s in intake.skipped}
    assert any("orientations" in r for k, r in skipped.items() if "3orient" in k)
    assert any("localizer" in r for k, r in skipped.items() if "Scout" in k)
    assert any("single image" in r for k, r in skipped.items() if "Phoenix" in k)
    assert len(intake.skipped) == 3
    # the plain dict interface loads the same volumes instead of stopping at the localizer
    assert set(imageio.load_study(root)) == {"t2_tse_tra", "t2_tse_cor"}
    d = intake.to_dict()
    assert {s["series"] for s in d["skipped"]} == set(skipped)


def test_dce_stored_as_separate_series_is_one_time_series_and_vfa_is_named(tmp_path):
    root, outside = tmp_path / "study", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    build_study(root, outside)
    intake = imageio.load_study_intake(root)
    assert set(intake.time_series) == {"t1_vibe_dyn_DCE", "t1_vibe_vfa_VFA"}
    dce = intake.time_series["t1_vibe_dyn_DCE"]
    assert dce.kind == "DCE" and len(dce.frames) == 8
    np.testing.assert_allclose(dce.times_s, 6.0 * np.arange(8), atol=1e-3)
    assert all(f.same_grid(dce.frames[0]) for f in dce.frames)
    vfa = intake.time_series["t1_vibe_vfa_VFA"]
    assert vfa.kind == "VFA" and vfa.flip_angles == [2.0, 5.0, 10.0, 15.0]
    assert "variable-flip-angle" in vfa.label


def test_symlink_next_to_its_target_is_read_once(tmp_path):
    root = tmp_path / "study"
    dicomio.write_dicom_series(_vol(), root / "t2", modality="MR", series_description="t2_tse_tra")
    os.symlink(root / "t2", root / "t2_again", target_is_directory=True)
    os.symlink(root, root / "t2" / "loop", target_is_directory=True)  # a link cycle must not hang
    (root / "extra").mkdir()
    first = sorted((root / "t2").glob("*.dcm"))[0]
    os.symlink(first, root / "extra" / "slice.dcm")  # one slice linked from another folder: not a duplicate
    intake = imageio.load_study_intake(root)
    assert list(intake.volumes) == ["t2_tse_tra"] and not intake.skipped


def test_study_without_any_usable_series_is_refused_with_the_reasons(tmp_path):
    write_three_orientation_localizer(tmp_path / "loc")
    with pytest.raises(InputDataError, match="no usable image series.*orientations"):
        imageio.load_study_intake(tmp_path)


def test_real_prostatex_series_reached_through_symlinks(shared_data, tmp_path):
    src = shared_data / "prostatex-0000"
    for name in ("dwi", "t2_tra", "adc_scanner"):
        if not (src / name).is_dir():
            pytest.skip("PROSTATEx not available")
        os.symlink(src / name, tmp_path / name, target_is_directory=True)
    write_three_orientation_localizer(tmp_path / "localizer")
    intake = imageio.load_study_intake(tmp_path)
    assert {"t2_tse_tra", "ep2d_diff_tra_DYNDIST_b800", "ep2d_diff_tra_DYNDIST_ADC"} <= set(intake.volumes)
    assert [s.reason for s in intake.skipped if "3orient" in s.label]


def test_derived_screenshot_series_is_skipped_with_its_reason(tmp_path):
    import pydicom

    dicomio.write_dicom_series(_vol(), tmp_path / "t2", modality="MR", series_description="t2_tse_tra", series_number=4)
    files = dicomio.write_dicom_series(_vol(seed=2), tmp_path / "shot", modality="MR",
                                       series_description="t2_tse_tra_MPR_screenshot", series_number=501)
    for f in files:  # a derived screen save: Secondary Capture SOP class
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
        ds.save_as(f)
    intake = imageio.load_study_intake(tmp_path)
    assert list(intake.volumes) == ["t2_tse_tra"]
    assert [s.reason for s in intake.skipped] == ["a secondary capture (screenshot), not an image volume"]

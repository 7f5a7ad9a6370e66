"""Image files in and out (NRRD/NIfTI/MHA), DICOM through load_image/load_study, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from scipy.spatial.transform import Rotation
from SmartBiopsyCoreLib.dataio import dicomio, imageio
from SmartBiopsyCoreLib.errors import InputDataError


def _volume(shape=(5, 7, 9), seed=1) -> RasVolume:
    rng = np.random.default_rng(seed)
    rot = Rotation.from_euler("zyx", [30, 10, -20], degrees=True).as_matrix()
    m = make_grid([-10.0, 22.0, 105.0], [0.8, 1.2, 2.5], shape, rot)
    return RasVolume(rng.normal(0, 100, shape).astype(np.float32), m, "v", {"units": "HU", "series_number": 3})


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_image_file_round_trip_keeps_geometry_and_values(tmp_path, ext):
    vol = _volume()
    path = imageio.save_image(vol, tmp_path / f"img{ext}")
    back = imageio.load_image(path)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.name == "img"
    if ext in (".nrrd", ".mha"):
        assert back.meta["units"] == "HU" and back.meta["series_number"] == 3


def test_nrrd_is_written_in_lps_as_slicer_and_itk_expect(tmp_path):
    vol = RasVolume(np.zeros((2, 2, 2), np.int16), make_grid([10.0, 20.0, 30.0], [1, 1, 1], (2, 2, 2)), "o")
    img = sitk.ReadImage(str(imageio.save_image(vol, tmp_path / "o.nrrd")))
    np.testing.assert_allclose(img.GetOrigin(), [-10.0, -20.0, 30.0])


def test_load_image_of_a_dicom_folder_matches_load_dicom_series(shared_data, tmp_path):
    t2 = shared_data / "prostatex-0000" / "t2_tra"
    if not t2.is_dir():
        pytest.skip("PROSTATEx T2 not available")
    a = imageio.load_image(t2)
    b = dicomio.load_dicom_series(t2)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.ijk_to_ras, b.ijk_to_ras)
    # one file of the series selects the series
    c = imageio.load_image(sorted(t2.iterdir())[0])
    np.testing.assert_allclose(c.ijk_to_ras, b.ijk_to_ras)


def test_load_study_keys_series_by_description_and_splits_dwi(shared_data):
    root = shared_data / "prostatex-0000"
    if not root.is_dir():
        pytest.skip("PROSTATEx not available")
    study = imageio.load_study(root)
    assert set(study) == {"t2_tse_tra", "ep2d_diff_tra_DYNDIST_b50", "ep2d_diff_tra_DYNDIST_b400",
                          "ep2d_diff_tra_DYNDIST_b800", "ep2d_diff_tra_DYNDIST_ADC"}
    assert study["ep2d_diff_tra_DYNDIST_b800"].meta["b_value"] == 800.0
    assert all(v.name == k for k, v in study.items())
    assert study["t2_tse_tra"].array.shape == (19, 384, 384)


def test_load_study_mixes_dicom_series_and_image_files_without_name_clashes(tmp_path):
    vol = _volume(shape=(4, 6, 6))
    dicomio.write_dicom_series(vol, tmp_path / "dcm_a", modality="MR", series_description="T2 ax", series_number=1)
    dicomio.write_dicom_series(vol, tmp_path / "dcm_b", modality="MR", series_description="T2 ax", series_number=2)
    imageio.save_image(vol, tmp_path / "nrrd" / "adc.nrrd")
    study = imageio.load_study(tmp_path)
    assert set(study) == {"T2_ax", "T2_ax_s2", "adc"}
    for v in study.values():
        np.testing.assert_allclose(v.ijk_to_ras, vol.ijk_to_ras, atol=1e-3)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(InputDataError, match="empty"):
        imageio.load_image(tmp_path)
    with pytest.raises(InputDataError, match="empty"):
        imageio.load_study(tmp_path)


def test_non_image_file_is_refused(tmp_path):
    p = tmp_path / "report.pdf"
    p.write_bytes(b"%PDF-1.4 not an image")
    with pytest.raises(InputDataError, match="report.pdf is not a supported image"):
        imageio.load_image(p)


def test_text_file_with_an_image_extension_is_refused(tmp_path):
    p = tmp_path / "fake.nrrd"
    p.write_text("this is not a NRRD header\n")
    with pytest.raises(InputDataError, match="fake.nrrd could not be read as an image"):
        imageio.load_image(p)


def test_truncated_nrrd_is_refused(tmp_path):
    p = imageio.save_image(_volume(shape=(8, 30, 30)), tmp_path / "t.nrrd", compress=False)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(InputDataError, match="t.nrrd could not be read"):
        imageio.load_image(p)


def test_unknown_extension_is_refused_on_save(tmp_path):
    with pytest.raises(InputDataError, match=r"cannot save to v\.png"):
        imageio.save_image(_volume(), tmp_path / "v.png")


def test_two_dimensional_image_is_refused_where_3d_is_needed(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((10, 12), np.float32))
    sitk.WriteImage(img, str(tmp_path / "slice.nrrd"))
    with pytest.raises(InputDataError, match=r"slice\.nrrd is a 2-D image"):
        imageio.load_image(tmp_path / "slice.nrrd")
    assert imageio.load_image(tmp_path / "slice.nrrd", require_3d=False).array.shape == (1, 10, 12)


def test_single_slice_dicom_is_refused_where_3d_is_needed(tmp_path):
    vol = _volume(shape=(1, 6, 6))
    dicomio.write_dicom_series(vol, tmp_path, modality="MR", series_description="scout", series_number=9)
    with pytest.raises(InputDataError, match=r"'scout'.*2-D image"):
        imageio.load_image(tmp_path)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        imageio.load_image(tmp_path / "nope")

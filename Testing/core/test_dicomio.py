"""DICOM import/export: real PROSTATEx series, writer round trips (oblique included) and broken input."""
from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from scipy.spatial.transform import Rotation
from SmartBiopsyCoreLib.dataio import dicomio
from SmartBiopsyCoreLib.errors import InputDataError


def _sitk_volume(folder, files=None) -> RasVolume:
    """The oracle: SimpleITK's GDCM series reader, converted to RAS by the geometry module."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files if files is not None else reader.GetGDCMSeriesFileNames(str(folder)))
    return RasVolume.from_sitk(reader.Execute())


@pytest.fixture(scope="module")
def prostatex(shared_data):
    root = shared_data / "prostatex-0000"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    return root


# ------------------------------------------------------------------------------------------------ real data
def test_scan_finds_t2_dwi_and_adc_series_with_b_values(prostatex):
    series = dicomio.scan_dicom_folder(prostatex)
    by_desc = {s.description: s for s in series}
    assert set(by_desc) == {"t2_tse_tra", "ep2d_diff_tra_DYNDIST", "ep2d_diff_tra_DYNDIST_ADC"}
    dwi = by_desc["ep2d_diff_tra_DYNDIST"]
    assert dwi.n_files == 57 and dwi.b_values == [50.0, 400.0, 800.0]
    assert by_desc["ep2d_diff_tra_DYNDIST_ADC"].b_values == []  # a derived map is not split by b
    assert by_desc["t2_tse_tra"].number == 4 and by_desc["t2_tse_tra"].modality == "MR"
    assert "files" not in dwi.to_dict()


@pytest.mark.parametrize("sub", ["t2_tra", "adc_scanner"])
def test_real_series_geometry_and_values_match_simpleitk(prostatex, sub):
    vol = dicomio.load_dicom_series(prostatex / sub)
    ref = _sitk_volume(prostatex / sub)
    assert vol.array.shape == ref.array.shape
    np.testing.assert_allclose(vol.ijk_to_ras, ref.ijk_to_ras, atol=1e-3)
    np.testing.assert_array_equal(vol.array.astype(float), ref.array.astype(float))
    # the acquisition is oblique: the slice normal is tilted by ~18 degrees from the scanner z axis
    k_axis = vol.direction_ras[:, 2]
    assert 15 < np.degrees(np.arccos(abs(k_axis[2]))) < 21


def test_dwi_splits_into_b50_b400_b800_with_19_slices_on_the_adc_grid(prostatex):
    dwi = dicomio.load_dwi_series(prostatex / "dwi")
    assert sorted(dwi) == [50.0, 400.0, 800.0]
    adc_ref = _sitk_volume(prostatex / "adc_scanner")
    for b, vol in dwi.items():
        assert vol.array.shape == (19, 128, 84)
        assert vol.meta["b_value"] == b
        np.testing.assert_allclose(vol.ijk_to_ras, adc_ref.ijk_to_ras, atol=1e-3)
    # diffusion weighting: mean signal falls as b grows
    means = [float(dwi[b].array.mean()) for b in (50.0, 400.0, 800.0)]
    assert means[0] > means[1] > means[2]
    # one b-value through load_dicom_series equals the DWI dict entry, and the geometry of SimpleITK
    # reading just those 19 files agrees
    b400 = dicomio.load_dicom_series(prostatex / "dwi", b_value=400)
    np.testing.assert_array_equal(b400.array, dwi[400.0].array)
    files = sorted(str(p) for p in (prostatex / "dwi").iterdir()
                   if dicomio.dicom_b_value(pydicom.dcmread(p, stop_before_pixels=True)) == 400.0)
    assert len(files) == 19
    ref = _sitk_volume(None, _sorted_by_sitk(files))
    np.testing.assert_allclose(b400.ijk_to_ras, ref.ijk_to_ras, atol=1e-3)
    np.testing.assert_array_equal(b400.array.astype(float), ref.array.astype(float))


def _sorted_by_sitk(files):
    """Order files along the slice normal as GDCM's IPPSorter does (written here, not our loader's code)."""
    def key(f):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        return float(np.asarray(ds.ImagePositionPatient, float) @ np.cross(iop[:3], iop[3:]))
    return sorted(files, key=key)


def test_adc_map_keeps_units_and_series_meta(prostatex):
    adc = dicomio.load_dicom_series(prostatex / "adc_scanner")
    assert adc.meta["units"] == dicomio.ADC_UNITS
    assert adc.meta["series_description"] == "ep2d_diff_tra_DYNDIST_ADC"
    assert adc.meta["series_number"] == 7
    assert adc.meta["modality"] == "MR"
    assert adc.meta["acquisition_date"] == "20110707"
    assert adc.meta["acquisition_time"].startswith("1203")
    assert "b_value" not in adc.meta
    # prostate/pelvic tissue ADC in 1e-6 mm^2/s: the median of the non-zero voxels is in a plausible range
    nz = adc.array[adc.array > 0]
    assert 500 < float(np.median(nz)) < 3000


def test_several_series_need_a_choice_and_the_error_lists_them(prostatex):
    with pytest.raises(InputDataError, match=r"3 DICOM series.*t2_tse_tra.*series 4"):
        dicomio.load_dicom_series(prostatex)
    t2_uid = next(s.uid for s in dicomio.scan_dicom_folder(prostatex) if s.number == 4)
    assert dicomio.load_dicom_series(prostatex, series_uid=t2_uid).meta["series_number"] == 4


def test_multi_b_series_without_a_b_value_is_refused(prostatex):
    with pytest.raises(InputDataError, match=r"ep2d_diff_tra_DYNDIST.*several b-values \(50/400/800"):
        dicomio.load_dicom_series(prostatex / "dwi")
    with pytest.raises(InputDataError, match=r"no b = 1000"):
        dicomio.load_dicom_series(prostatex / "dwi", b_value=1000)


# ------------------------------------------------------------------------------------------------ writer
def _oblique_volume(dtype=np.float32, shape=(9, 24, 31), seed=0) -> RasVolume:
    rng = np.random.default_rng(seed)
    rot = Rotation.from_euler("xyz", [25, -12, 40], degrees=True).as_matrix()
    m = make_grid([12.5, -40.0, 77.0], [0.7, 1.3, 3.5], shape, rot)
    arr = rng.normal(800.0, 250.0, shape).astype(dtype)
    return RasVolume(arr, m, "oblique")


def test_written_oblique_mr_round_trips_through_simpleitk_and_our_reader(tmp_path):
    vol = _oblique_volume()
    dicomio.write_dicom_series(vol, tmp_path, modality="MR", series_description="oblique T2", series_number=12)
    ours = dicomio.load_dicom_series(tmp_path)
    theirs = _sitk_volume(tmp_path)
    precision = (vol.array.max() - vol.array.min()) / 65000.0
    for back in (ours, theirs):
        np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-3)
        assert np.max(np.abs(back.array - vol.array)) <= precision
    assert ours.meta["series_description"] == "oblique T2" and ours.meta["series_number"] == 12
    ds = pydicom.dcmread(next(tmp_path.iterdir()))
    assert ds.SOPClassUID == dicomio.MR_IMAGE_STORAGE
    # PixelSpacing is row spacing (between rows = along j) then column spacing (along i)
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [1.3, 0.7], atol=1e-6)
    assert float(ds.SliceThickness) == pytest.approx(3.5)


def test_written_ct_keeps_integer_hu_exactly(tmp_path):
    rng = np.random.default_rng(3)
    arr = rng.integers(-1024, 3000, (6, 20, 16)).astype(np.int16)
    vol = RasVolume(arr, make_grid([-100.0, 50.0, -300.0], [0.9, 0.9, 2.0], arr.shape), "ct")
    files = dicomio.write_dicom_series(vol, tmp_path, modality="CT", series_description="CT", series_number=2)
    assert len(files) == 6
    ours = dicomio.load_dicom_series(tmp_path)
    theirs = _sitk_volume(tmp_path)
    for back in (ours, theirs):
        np.testing.assert_array_equal(back.array.astype(np.int32), arr.astype(np.int32))
        np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-3)
    assert ours.meta["units"] == "HU" and ours.array.dtype == np.int16
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == dicomio.CT_IMAGE_STORAGE and ds.Modality == "CT"


def test_left_handed_volume_is_read_back_with_reversed_slices_at_the_same_positions(tmp_path):
    vol = _oblique_volume(shape=(5, 8, 7))
    flip = vol.ijk_to_ras.copy()
    flip[:3, 2] *= -1  # k axis against row x column
    vol = RasVolume(vol.array, flip, "lh")
    dicomio.write_dicom_series(vol, tmp_path, modality="MR", series_description="lh", series_number=1)
    back = dicomio.load_dicom_series(tmp_path)
    # every voxel centre holds the same value in space
    centres = vol.voxel_centres_ras(np.ones(vol.array.shape, bool))
    kji = np.rint(back.ras_to_ijk_points(centres)[:, ::-1]).astype(int)
    np.testing.assert_allclose(back.array[tuple(kji.T)], vol.array.ravel(), atol=0.02)


def test_written_dwi_carries_b_values_in_standard_and_siemens_tags(tmp_path):
    base = _oblique_volume(shape=(6, 16, 12))
    adc = 1.2e-3
    volumes = {b: base.with_array((1000.0 * np.exp(-b * adc) * np.ones(base.array.shape)).astype(np.float32))
               for b in (0.0, 50.0, 400.0, 800.0)}
    files = dicomio.write_dwi_series(volumes, tmp_path, series_description="DWI", series_number=5)
    assert len(files) == 24
    [info] = dicomio.scan_dicom_folder(tmp_path)
    assert info.b_values == [0.0, 50.0, 400.0, 800.0] and info.n_files == 24
    back = dicomio.load_dwi_series(tmp_path)
    assert sorted(back) == [0.0, 50.0, 400.0, 800.0]
    for b, v in back.items():
        np.testing.assert_allclose(v.ijk_to_ras, base.ijk_to_ras, atol=1e-3)
        np.testing.assert_allclose(v.array, volumes[b].array, atol=1000.0 / 65000.0)
    ds = pydicom.dcmread(files[-1])
    assert ds[0x0018, 0x9087].VR == "FD" and ds[0x0018, 0x9087].value == 800.0
    assert ds[0x0019, 0x0010].value == dicomio.SIEMENS_MR_CREATOR
    assert ds[0x0019, 0x100C].VR == "IS" and int(ds[0x0019, 0x100C].value) == 800
    # SimpleITK reads one b-value's files with the same geometry
    b800 = [f for f in files if float(pydicom.dcmread(f, stop_before_pixels=True)[0x0018, 0x9087].value) == 800.0]
    np.testing.assert_allclose(_sitk_volume(None, _sorted_by_sitk(b800)).ijk_to_ras, base.ijk_to_ras, atol=1e-3)


@pytest.mark.parametrize("keep", ["standard", "siemens", "sequence_name"])
def test_b_value_is_found_from_each_tag_alone(tmp_path, keep):
    base = _oblique_volume(shape=(3, 8, 8))
    files = dicomio.write_dwi_series({50.0: base, 800.0: base}, tmp_path / "w")
    for f in files:
        ds = pydicom.dcmread(f)
        if keep != "standard":
            del ds[0x0018, 0x9087]
        if keep != "siemens":
            del ds[0x0019, 0x100C]
            del ds[0x0019, 0x0010]
        if keep != "sequence_name":
            ds.SequenceName = "ep2d"
        ds.save_as(f)
    assert sorted(dicomio.load_dwi_series(tmp_path / "w")) == [50.0, 800.0]


def test_uid_seed_makes_uids_deterministic(tmp_path):
    vol = _oblique_volume(shape=(2, 4, 4))
    a = dicomio.write_dicom_series(vol, tmp_path / "a", modality="MR", series_description="x", uid_seed="7")
    b = dicomio.write_dicom_series(vol, tmp_path / "b", modality="MR", series_description="x", uid_seed="7")
    da, db = pydicom.dcmread(a[1]), pydicom.dcmread(b[1])
    assert da.SOPInstanceUID == db.SOPInstanceUID and da.SeriesInstanceUID == db.SeriesInstanceUID
    assert da.SOPInstanceUID != pydicom.dcmread(a[0]).SOPInstanceUID


def test_writer_refuses_sheared_grids_and_mismatched_dwi(tmp_path):
    vol = _oblique_volume(shape=(3, 4, 4))
    m = vol.ijk_to_ras.copy()
    m[:3, 2] += 0.5 * m[:3, 0]
    with pytest.raises(InputDataError, match="sheared"):
        dicomio.write_dicom_series(RasVolume(vol.array, m, "s"), tmp_path / "s", modality="MR")
    other = RasVolume(vol.array, vol.ijk_to_ras + _shift(5.0), "o")
    with pytest.raises(InputDataError, match="same grid"):
        dicomio.write_dwi_series({0.0: vol, 800.0: other}, tmp_path / "d")


def _shift(mm):
    t = np.zeros((4, 4))
    t[0, 3] = mm
    return t


# ------------------------------------------------------------------------------------------------ bad input
def _copy(src, dst, skip=()):
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(InputDataError, match="empty"):
        dicomio.load_dicom_series(tmp_path)


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "data.bin").write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(InputDataError, match="no DICOM images"):
        dicomio.load_dicom_series(tmp_path)


@pytest.mark.parametrize("cut", [100, 700, 100_000])
def test_truncated_dicom_file_is_refused_and_named(prostatex, tmp_path, cut):
    folder = _copy(prostatex / "t2_tra", tmp_path / "t2")
    f = folder / "1-10.dcm"
    f.write_bytes(f.read_bytes()[:cut])
    with pytest.raises(InputDataError, match=r"t2_tse_tra.*1-10\.dcm.*truncated or corrupt"):
        dicomio.load_dicom_series(folder)


def test_series_with_a_missing_middle_slice_is_refused(prostatex, tmp_path):
    folder = _copy(prostatex / "t2_tra", tmp_path / "t2", skip={"1-10.dcm"})
    with pytest.raises(InputDataError, match=r"'t2_tse_tra' \(series 4\) is missing 1 slice"):
        dicomio.load_dicom_series(folder)


def test_dwi_with_a_missing_slice_names_the_b_value(prostatex, tmp_path):
    victim = next(f.name for f in sorted((prostatex / "dwi").iterdir())
                  if dicomio.dicom_b_value(pydicom.dcmread(f, stop_before_pixels=True)) == 400.0
                  and 8 <= int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) % 19 <= 12)
    folder = _copy(prostatex / "dwi", tmp_path / "dwi", skip={victim})
    with pytest.raises(InputDataError, match=r"ep2d_diff_tra_DYNDIST.*\(b = 400\) is missing"):
        dicomio.load_dwi_series(folder)


def test_duplicated_slice_is_refused(prostatex, tmp_path):
    folder = _copy(prostatex / "t2_tra", tmp_path / "t2")
    ds = pydicom.dcmread(folder / "1-05.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.InstanceNumber = 99
    ds.save_as(folder / "copy-of-05.dcm")
    with pytest.raises(InputDataError, match=r"'t2_tse_tra' \(series 4\) has duplicated slices"):
        dicomio.load_dicom_series(folder)


def test_mixed_orientation_is_refused(prostatex, tmp_path):
    folder = _copy(prostatex / "t2_tra", tmp_path / "t2")
    ds = pydicom.dcmread(folder / "1-07.dcm")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice inside an axial series
    ds.save_as(folder / "1-07.dcm")
    with pytest.raises(InputDataError, match=r"'t2_tse_tra' \(series 4\) mixes slices of different orientations"):
        dicomio.load_dicom_series(folder)


def test_mixed_slice_size_is_refused(tmp_path):
    vol = _oblique_volume(shape=(4, 6, 6))
    files = dicomio.write_dicom_series(vol, tmp_path, modality="MR", series_description="sz", series_number=3)
    ds = pydicom.dcmread(files[2])
    ds.Rows, ds.Columns = 3, 12
    ds.save_as(files[2])
    with pytest.raises(InputDataError, match=r"'sz' \(series 3\) mixes slices of different sizes"):
        dicomio.load_dicom_series(tmp_path)


def test_irregular_slice_spacing_is_refused(tmp_path):
    vol = _oblique_volume(shape=(6, 6, 6))
    files = dicomio.write_dicom_series(vol, tmp_path, modality="MR", series_description="irr", series_number=8)
    ds = pydicom.dcmread(files[3])
    normal = np.cross(np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float))
    ds.ImagePositionPatient = list(np.asarray(ds.ImagePositionPatient, float) + 0.8 * normal)
    ds.save_as(files[3])
    with pytest.raises(InputDataError, match=r"'irr' \(series 8\) has irregular slice spacing"):
        dicomio.load_dicom_series(tmp_path)


# ------------------------------------------------------------------------------------------------ encodings
def test_rle_compressed_series_is_decoded(tmp_path):
    from pydicom.uid import RLELossless

    rng = np.random.default_rng(11)
    arr = rng.integers(-1000, 2000, (4, 12, 10)).astype(np.int16)
    vol = RasVolume(arr, make_grid([0.0, 0.0, 0.0], [0.5, 0.5, 1.5], arr.shape), "ct")
    for f in dicomio.write_dicom_series(vol, tmp_path, modality="CT", series_description="rle"):
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless)
        ds.save_as(f)
    assert pydicom.dcmread(next(tmp_path.iterdir())).file_meta.TransferSyntaxUID == RLELossless
    back = dicomio.load_dicom_series(tmp_path)
    np.testing.assert_array_equal(back.array, arr)


def test_signed_12_bit_pixels_and_per_slice_rescale_are_applied(tmp_path):
    rng = np.random.default_rng(12)
    arr = rng.integers(-2000, 2000, (3, 8, 8)).astype(np.int16)
    vol = RasVolume(arr, make_grid([0.0, 0.0, 0.0], [1.0, 1.0, 2.0], arr.shape), "ct")
    files = dicomio.write_dicom_series(vol, tmp_path, modality="CT", series_description="12bit")
    for n, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = str(n + 1), str(-10 * n)  # a different rescale per slice
        ds.save_as(f)
    back = dicomio.load_dicom_series(tmp_path)
    expected = arr.astype(np.int64) * np.arange(1, 4)[:, None, None] - 10 * np.arange(3)[:, None, None]
    np.testing.assert_array_equal(back.array.astype(np.int64), expected)
    np.testing.assert_array_equal(_sitk_volume(tmp_path).array.astype(np.int64), expected)


# ------------------------------------------------------------------------------------------------ phantom
def test_phantom_ct_and_dwi_dicom_copies_match_their_volumes(phantom0, tmp_path):
    ct = phantom0.ct
    dicomio.write_dicom_series(ct, tmp_path / "ct", modality="CT", series_description="CT", series_number=2)
    dwi = {b: phantom0.mri[f"dwi_b{b}"] for b in (0, 50, 400, 800)}
    dicomio.write_dwi_series(dwi, tmp_path / "dwi", series_description="DWI", series_number=5)
    back_ct = dicomio.load_dicom_series(tmp_path / "ct")
    np.testing.assert_allclose(back_ct.ijk_to_ras, ct.ijk_to_ras, atol=1e-3)
    np.testing.assert_array_equal(back_ct.array.astype(np.int32), np.asarray(ct.array).astype(np.int32))
    back = dicomio.load_dwi_series(tmp_path / "dwi")
    assert sorted(back) == [0.0, 50.0, 400.0, 800.0]
    top = max(float(v.array.max()) for v in dwi.values())
    for b, v in dwi.items():
        np.testing.assert_allclose(back[float(b)].ijk_to_ras, v.ijk_to_ras, atol=1e-3)
        assert np.max(np.abs(back[float(b)].array - v.array)) <= top / 65000.0

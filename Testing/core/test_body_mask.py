"""The one CT body mask of the core (used by fusion, planning and the report)."""
import numpy as np
import pytest

from SmartBiopsyCoreLib.body import BODY_HU_THRESHOLD, body_mask, body_mask_array, subsampled
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid


def _ct():
    """Air, an elliptic body of fat (-100 HU) with a lung (-850 HU) inside, a table plate below (200 HU)."""
    k, j, i = np.mgrid[0:20, 0:60, 0:80]
    a = np.full(k.shape, -1000.0)
    body = ((i - 40) / 30.0) ** 2 + ((j - 28) / 20.0) ** 2 <= 1.0
    a[body] = -100.0
    lung = ((i - 45) / 8.0) ** 2 + ((j - 28) / 6.0) ** 2 <= 1.0
    a[lung] = -850.0
    a[:, 52:55, 5:75] = 200.0  # table, 4 voxels below the body
    return RasVolume(a.astype(np.int16), make_grid([0.0, 0.0, 0.0], [1.0, 1.0, 2.0], a.shape), "ct"), body, lung


def test_body_is_the_largest_component_with_holes_filled_and_no_table():
    ct, body, lung = _ct()
    m = body_mask_array(ct)
    assert m.dtype == bool and m.shape == ct.array.shape
    assert np.array_equal(m, body)  # lung filled, table and air out
    assert m[:, 28, 45].all()  # the lung is a hole, filled through every slice, the end slices included
    assert not m[:, 53, 40].any()


def test_volume_variant_is_a_uint8_mask_on_the_ct_grid():
    ct, body, _ = _ct()
    vol = body_mask(ct)
    assert vol.same_grid(ct) and vol.array.dtype == np.uint8 and int(vol.array.sum()) == int(body.sum())


def test_threshold_constant_keeps_fat_and_drops_lung():
    assert -850.0 < BODY_HU_THRESHOLD < -100.0


def test_subsampled_volume_keeps_world_positions():
    ct, _, _ = _ct()
    sub = subsampled(ct, (2, 3, 4))
    assert sub.array.shape == ct.array[::2, ::3, ::4].shape
    assert np.allclose(sub.kji_to_ras_points(np.array([[3, 5, 7]])), ct.kji_to_ras_points(np.array([[6, 15, 28]])))


def test_ct_without_body_is_refused_with_a_sentence():
    ct, _, _ = _ct()
    with pytest.raises(InputDataError, match="no body found in the CT"):
        body_mask_array(ct.with_array(np.full(ct.array.shape, -1000, np.int16)))


# ------------------------------------------------------------------------------------------------
# The mask is computed on the body's bounding box with one labelling per step; it must equal, voxel for
# voxel, the straightforward whole-volume pipeline below (SimpleITK components sorted by size, 3-D hole
# filling of the mask padded with one body slice at each end).
def _reference_body(ct, threshold=BODY_HU_THRESHOLD):
    import SimpleITK as sitk

    m = np.asarray(ct.array) > threshold
    rel = sitk.RelabelComponentImageFilter()
    rel.SetSortByObjectSize(True)
    m = sitk.GetArrayFromImage(rel.Execute(sitk.ConnectedComponent(sitk.GetImageFromArray(m.astype(np.uint8))))) == 1
    padded = np.pad(m, ((1, 1), (0, 0), (0, 0)), constant_values=True)
    filled = sitk.BinaryFillhole(sitk.GetImageFromArray(padded.astype(np.uint8)), fullyConnected=False)
    return sitk.GetArrayFromImage(filled)[1:-1] > 0


def _blobs(seed, shape=(24, 40, 48), body_slices=None, fraction=0.55, n_blobs=3):
    """Random smooth blobs above the threshold with cavities, some cut by the first/last slice, plus noise
    specks (many small components) outside them."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.random(shape), 2.0)
    body = f > np.quantile(f, 1.0 - fraction)
    a = np.where(body, -100.0, -1000.0)
    cav = ndimage.gaussian_filter(rng.random(shape), 1.5)
    a[body & (cav < np.quantile(cav, 0.12))] = -850.0
    specks = rng.random(shape) < 0.002
    a[specks & ~body] = 50.0
    if body_slices is not None:
        a[:body_slices[0]] = -1000.0
        a[body_slices[1]:] = -1000.0
    return RasVolume(a.astype(np.int16), make_grid([0.0, 0.0, 0.0], [1.0, 1.0, 2.0], shape), "ct")


@pytest.mark.parametrize("seed, body_slices", [(0, None), (1, None), (2, (3, 20)), (3, (0, 18)), (4, (5, 24))])
def test_body_mask_equals_the_whole_volume_pipeline_on_random_bodies_with_cavities(seed, body_slices):
    ct = _blobs(seed, body_slices=body_slices)
    ref = _reference_body(ct)
    assert ref.any() and (ref & (np.asarray(ct.array) <= BODY_HU_THRESHOLD)).any()  # cavities were filled
    assert np.array_equal(body_mask_array(ct), ref)


def test_largest_component_equals_the_size_sorted_component_with_few_and_many_components():
    from SmartBiopsyCoreLib.body import largest_component

    for seed, fraction in ((5, 0.3), (6, 0.08), (7, 0.5)):
        ct = _blobs(seed, fraction=fraction)
        m = np.asarray(ct.array) > BODY_HU_THRESHOLD
        import SimpleITK as sitk

        rel = sitk.RelabelComponentImageFilter()
        rel.SetSortByObjectSize(True)
        ref = sitk.GetArrayFromImage(rel.Execute(sitk.ConnectedComponent(sitk.GetImageFromArray(m.astype(np.uint8))))) == 1
        assert np.array_equal(largest_component(m), ref)
    two = np.zeros((5, 6, 7), bool)
    two[1, 1, 1] = True
    two[3, 3:5, 3:6] = True
    assert np.array_equal(largest_component(two), two & (np.arange(5) == 3)[:, None, None])


def test_body_mask_equals_the_whole_volume_pipeline_on_the_abdomen_phantom():
    from SmartBiopsyCoreLib.phantom import abdomen

    ct, _, _ = abdomen.make_abdomen(spacing=(1.6, 1.6, 2.0), fov_mm=(409.6, 409.6, 120.0))
    assert np.array_equal(body_mask_array(ct), _reference_body(ct))
    crop = RasVolume(np.asarray(ct.array)[10:50, 40:200, 20:230], ct.ijk_to_ras, "crop")  # body cut by the box
    assert np.array_equal(body_mask_array(crop), _reference_body(crop))


def test_body_mask_equals_the_whole_volume_pipeline_on_the_real_head_ct(shared_data):
    from SmartBiopsyCoreLib.dataio.imageio import load_image

    ct = load_image(shared_data / "rire-pat002/pat002_ct.nrrd")
    ref = _reference_body(ct)
    assert ref.sum() > 1000
    assert np.array_equal(body_mask_array(ct), ref)

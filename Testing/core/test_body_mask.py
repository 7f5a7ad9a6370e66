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

"""On-disk phantom cache (demo only): keyed by every generator argument and the generator's version."""
import numpy as np
import pytest

from SmartBiopsyCoreLib.phantom import sarcoma


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("SMARTBIOPSY_PHANTOM_CACHE_DIR", str(d))
    monkeypatch.delenv("SMARTBIOPSY_PHANTOM_CACHE", raising=False)
    return d


@pytest.fixture
def counted(monkeypatch, phantom0):
    """Replace generation by a counter returning the session's phantom (generation itself is tested elsewhere)."""
    calls = []

    def fake(seed, *a, **k):
        calls.append((seed, a, k))
        return phantom0

    monkeypatch.setattr(sarcoma, "_generate", fake)
    return calls


def test_second_process_reads_the_phantom_from_the_disk_cache(cache_dir, counted, phantom0):
    a = sarcoma.generate_phantom(0, cache=False, disk_cache=True, robot_frame="zframe-7tube")
    files = list(cache_dir.glob("phantom-*.pickle"))
    assert len(files) == 1 and len(counted) == 1
    b = sarcoma.generate_phantom(0, cache=False, disk_cache=True, robot_frame="zframe-7tube")
    assert len(counted) == 1  # not generated again
    assert b is not a and np.array_equal(b.ct.array, phantom0.ct.array)
    assert np.array_equal(b.ct.ijk_to_ras, phantom0.ct.ijk_to_ras)
    assert np.array_equal(b.truth.mri_to_ct, phantom0.truth.mri_to_ct)
    assert set(b.mri) == set(phantom0.mri)


def test_each_option_and_generator_version_has_its_own_entry(cache_dir, counted, monkeypatch):
    sarcoma.generate_phantom(0, cache=False, disk_cache=True)
    sarcoma.generate_phantom(0, cache=False, disk_cache=True, robot_frame="zframe-7tube")
    sarcoma.generate_phantom(1, cache=False, disk_cache=True)
    sarcoma.generate_phantom(0, cache=False, disk_cache=True, ct_noise_hu=5.0)
    assert len(counted) == 4 and len(list(cache_dir.glob("phantom-*.pickle"))) == 4
    # a changed generator invalidates every entry (and the stale files are removed)
    monkeypatch.setattr(sarcoma, "PHANTOM_GENERATOR_VERSION", sarcoma.PHANTOM_GENERATOR_VERSION + 1)
    sarcoma.generate_phantom(0, cache=False, disk_cache=True)
    assert len(counted) == 5 and len(list(cache_dir.glob("phantom-*.pickle"))) == 1


def test_disk_cache_is_off_unless_asked_and_can_be_turned_off(cache_dir, counted, monkeypatch):
    sarcoma.generate_phantom(0, cache=False)
    assert not cache_dir.exists()
    monkeypatch.setenv("SMARTBIOPSY_PHANTOM_CACHE", "0")
    assert sarcoma.phantom_disk_cache_dir() is None
    sarcoma.generate_phantom(0, cache=False, disk_cache=True)
    sarcoma.generate_phantom(0, cache=False, disk_cache=True)
    assert len(counted) == 3 and not cache_dir.exists()


def test_a_corrupt_cache_file_is_regenerated(cache_dir, counted):
    sarcoma.generate_phantom(0, cache=False, disk_cache=True)
    (f,) = cache_dir.glob("phantom-*.pickle")
    f.write_bytes(b"not a pickle")
    sarcoma.generate_phantom(0, cache=False, disk_cache=True)
    assert len(counted) == 2
    assert sarcoma._disk_cache_read(f) is not None  # rewritten whole


def test_default_cache_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("SMARTBIOPSY_PHANTOM_CACHE_DIR", raising=False)
    monkeypatch.delenv("SMARTBIOPSY_PHANTOM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sarcoma.phantom_disk_cache_dir() == tmp_path / "smartbiopsy" / "phantom"


def test_the_deformation_pickles_so_a_deformed_case_can_be_cached():
    import pickle

    import numpy as np

    from SmartBiopsyCoreLib.phantom.sarcoma import displacement_from_params

    d = displacement_from_params({"amplitude_mm": 2.5, "k_per_mm": np.eye(3).tolist(), "phase_rad": [0.1, 0.2, 0.3],
                                  "centre_ras": [10.0, 0.0, -5.0], "sigma_mm": 45.0})
    pts = np.array([[0.0, 0.0, 0.0], [12.0, -3.0, 4.0]])
    back = pickle.loads(pickle.dumps(d))
    assert np.array_equal(back(pts), d(pts)) and back.params == d.params

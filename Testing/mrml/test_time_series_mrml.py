"""A DCE time series becomes ONE Sequence node (with a browser and a proxy volume) in a real MRML scene."""
from __future__ import annotations

import numpy as np

from SmartBiopsyCoreLib.dataio.volumes_mrml import add_time_series_node, volume_from_node
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyCoreLib.runtime import new_runtime


def dce_frames(n_frames, arrival):
    m = make_grid([-9.0, -6.0, -3.0], [1.5, 1.5, 3.0], (3, 8, 10), np.eye(3))
    frames = [RasVolume(np.full((3, 8, 10), 100.0 + (50.0 if t >= arrival else 0.0) + t, np.float32), m, f"f{t}", {})
              for t in range(n_frames)]
    return frames, [6.0 * t for t in range(n_frames)]


def test_dce_frames_become_one_sequence_node_indexed_by_time():
    rt = new_runtime()
    frames, times = dce_frames(n_frames=5, arrival=2)
    seq, browser, proxy = add_time_series_node(rt.scene, frames, times, "t1_vibe_dyn_DCE", "DCE",
                                               rt.logics["sequences"])
    assert seq.GetNumberOfDataNodes() == 5 and seq.GetIndexUnit() == "s"
    assert [seq.GetNthIndexValue(i) for i in range(5)] == [f"{t:g}" for t in times]
    assert rt.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1  # only the proxy is a volume
    browser.SetSelectedItemNumber(4)
    np.testing.assert_allclose(volume_from_node(browser.GetProxyNode(seq)).array, frames[4].array)
    np.testing.assert_allclose(volume_from_node(proxy).ijk_to_ras, frames[0].ijk_to_ras, atol=1e-6)


def test_ef_from_a_dce_sequence_node_states_baseline_and_peak():
    from SmartBiopsyCoreLib.dataio.volumes_mrml import time_series_from_sequence_node
    from SmartBiopsyCoreLib.phantom.dce import dce_frames as simulated_dce
    from SmartBiopsyLib.characterise import maps

    rt = new_runtime()
    frames, times = simulated_dce(n_frames=8, arrival=3)
    seq, _browser, _proxy = add_time_series_node(rt.scene, frames, times, "dce", "DCE", rt.logics["sequences"])
    back, t, kind = time_series_from_sequence_node(seq)
    assert kind == "DCE" and t == times
    np.testing.assert_allclose(back[5].array, frames[5].array)
    ef = maps.compute_ef_dynamic(back, t)
    assert ef.meta["dynamic"]["baseline_frames"] == [0, 1, 2] and ef.meta["dynamic"]["post_choice"] == "peak"

"""Planner on the digital phantom: every returned path keeps every margin (independent KD-tree ray-march)."""
import numpy as np
import pytest
from scipy import ndimage

from planner_oracle import Oracle
from TrajectoryPlannerLib.planning import engine
LABELS = {3: "bone", 4: "aorta", 5: "ivc", 6: "kidney", 7: "bowel", 8: "bowel_gas"}
MARGINS = {"bone": 3.0, "aorta": 10.0, "ivc": 10.0, "kidney": 5.0, "bowel": 5.0, "bowel_gas": 5.0}


def _targets(case):
    out = []
    for value, name in ((1, "A"), (2, "B"), (3, "C")):
        m = case.ct_habitats.array == value
        d = ndimage.distance_transform_edt(m, sampling=case.ct.spacing[::-1])
        k = np.unravel_index(int(np.argmax(d)), d.shape)
        out.append({"name": name, "region": name, "point_ras": case.ct.kji_to_ras_points(np.array([k]))[0].tolist()})
    return out


@pytest.fixture(scope="module")
def oracle(phantom0):
    return Oracle(phantom0.ct_labels, {name: (v,) for v, name in LABELS.items()}, outside_values=(0, 11))


@pytest.mark.parametrize("mode", ["oblique", "in-plane"])
def test_phantom_paths_clear_every_structure_by_its_margin(phantom0, oracle, mode):
    r = engine.plan(phantom0.ct, _targets(phantom0), "15G/16G-16cm", labelmaps=[(phantom0.ct_labels, LABELS)],
                    settings=engine.PlanSettings(mode=mode, top_n=2, allow_partial=(mode == "in-plane")))
    trs = r.trajectories + (r.shared_entry.trajectories if r.shared_entry else [])
    assert len(trs) >= (6 if mode == "oblique" else 2)
    radius = r.needle.outer_radius_mm
    for tr in trs:
        d = oracle.axis_distances(tr.entry_ras, tr.tip_ras, step_mm=0.1)
        for name, dist in d.items():
            assert dist - radius >= MARGINS[name] - 1e-6, (mode, tr.name, name, dist - radius)
            assert tr.clearance_mm[name] <= dist - radius + 1e-6
        assert not oracle.leaves_body(tr.entry_ras, tr.target_ras), tr.name
        assert tr.length_mm <= r.needle.max_reach_mm
        if mode == "in-plane":
            assert tr.angle_to_axial_deg <= 1.0 + 1e-9
    if mode == "oblique":
        assert r.shared_entry is not None
        assert all(v["score_loss"] >= -1e-9 for v in r.shared_entry.tradeoff.values())

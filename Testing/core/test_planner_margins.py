"""Margins that bind: clearance-blind ranking returns paths close to the margins, checked by the independent
oracle (voxel-surface distances); exact distance maps from ``edt`` and from the SimpleITK fallback agree."""
import logging
import sys

import numpy as np
import pytest
from scipy import ndimage

from planner_oracle import Oracle
from SmartBiopsyCoreLib.phantom import abdomen as synthetic
from TrajectoryPlannerLib.planning import engine

# the planner's default margins (mm) for the phantom's structures, stated independently of the planner
MARGINS = {"bone": 3.0, "gas": 5.0, "aorta": 10.0, "ivc": 10.0, "kidney": 5.0, "bowel": 5.0, "bowel_gas": 5.0}
ORACLE_LABELS = {"bone": (3,), "gas": (8,), "aorta": (4,), "ivc": (5,), "kidney": (6,), "bowel": (7,),
                 "bowel_gas": (8,)}


@pytest.fixture(scope="module")
def abdomen():
    """1 mm voxels: the planner's conservative bound (2 x half diagonal + step / 2) stays below half of every
    margin, so a halved margin shows up as a violation."""
    return synthetic.make_abdomen(spacing=(1.0, 1.0, 1.0), fov_mm=(360.0, 300.0, 100.0))


@pytest.fixture(scope="module")
def oracle(abdomen):
    return Oracle(abdomen[1], ORACLE_LABELS)


# Targets beside each structure, on the skin side: the shortest paths would drive the fired tip (14.5 mm beyond
# the target) into the structure's margin, so the clearance-blind ranking returns paths that graze it.
BESIDE = [{"name": "aorta", "point_ras": [-22.0, -10.0, 0.0]},    # 18 mm anterior of the aorta
          {"name": "ivc", "point_ras": [44.8, -22.2, 45.0]},      # 18 mm anterior-right of the IVC
          {"name": "kidney", "point_ras": [80.0, -22.0, 20.0]},   # 13 mm anterior of the right kidney
          {"name": "bowel", "point_ras": [30.0, 75.0, 0.0]},      # 13 mm anterior of the bowel wall
          {"name": "rib", "point_ras": [-100.0, 45.0, 4.0]}]      # under a rib
#: without the bowel label, only the automatic gas (from HU) guards the bowel's gas
GAS_ONLY_LABELS = {3: "bone", 4: "aorta", 5: "ivc", 6: "kidney"}
BESIDE_GAS = [{"name": "gas", "point_ras": [30.0, 65.0, 0.0]}]    # 13 mm anterior of the bowel gas
BLIND = dict(weight_clearance=0.0, top_n=60, min_entry_separation_mm=4.0, shared_entry=False)


def _slack(plan, oracle, margins):
    """Per structure: the smallest (surface distance - needle radius - margin) over the returned paths (mm)."""
    radius = plan.needle.outer_radius_mm
    worst = {}
    for tr in plan.trajectories:
        assert tr.margin_mm == {k: margins[k] for k in tr.margin_mm}
        for name, dist in oracle.axis_surface_distances(tr.entry_ras, tr.tip_ras).items():
            if name in tr.margin_mm:
                assert tr.clearance_mm[name] <= dist - radius + 1e-6, (tr.name, name)
                # the planner's own guarantee: accepted paths report at least the margin (float32 maps: 1e-3)
                assert tr.clearance_mm[name] >= margins[name] - 1e-3, (tr.name, name, tr.clearance_mm[name])
                worst[name] = min(worst.get(name, np.inf), dist - radius - margins[name])
    return worst


@pytest.fixture(scope="module")
def blind_plan(abdomen):
    """Ranking that ignores clearance (weight 0) and returns many paths: the margins alone keep them safe."""
    ct, labels, targets = abdomen
    return engine.plan(ct, targets + BESIDE, labelmaps=[(labels, synthetic.RISK_LABELS)],
                       settings=engine.PlanSettings(**BLIND))


def test_clearance_blind_ranking_keeps_every_margin_to_voxel_surfaces(blind_plan, oracle):
    r = blind_plan
    assert len(r.trajectories) >= 200
    worst = _slack(r, oracle, MARGINS)
    assert min(worst.values()) >= -1e-6, worst
    # the case binds: for every structure some returned path runs within two bounds of its margin, so a
    # removed or halved margin shows up as a violation. gas and bowel_gas are the same voxels inside the
    # bowel wall, which always keeps paths farther away (the automatic gas binds in the next test).
    binding = 2 * (r.error_bound_mm + r.surface_offset_mm)
    for name in ("bone", "aorta", "ivc", "kidney", "bowel"):
        assert worst[name] < binding, (name, worst[name], binding)


def test_clearance_blind_ranking_keeps_the_automatic_gas_margin(abdomen):
    ct, labels, _ = abdomen
    r = engine.plan(ct, BESIDE_GAS, labelmaps=[(labels, GAS_ONLY_LABELS)], settings=engine.PlanSettings(**BLIND))
    assert {s["name"] for s in r.risk["structures"]} == {"bone", "gas", "aorta", "ivc", "kidney"}
    worst = _slack(r, Oracle(labels, {"gas": (8,), "bone": (3,)}), MARGINS)
    assert len(r.trajectories) >= 20
    assert worst["gas"] >= -1e-6 and worst["bone"] >= -1e-6, worst
    assert worst["gas"] < 2 * (r.error_bound_mm + r.surface_offset_mm), worst


def test_reported_clearance_is_exact_to_voxel_surfaces_within_half_a_step(blind_plan, oracle):
    for tr in blind_plan.trajectories[::10]:
        d = oracle.axis_surface_distances(tr.entry_ras, tr.tip_ras)
        for name, dist in d.items():
            surface = dist - blind_plan.needle.outer_radius_mm
            assert tr.clearance_mm[name] >= surface - 0.25 - 0.05, (tr.name, name)


def test_surface_distance_of_one_voxel_is_to_its_box_not_its_centre():
    from SmartBiopsyCoreLib.geometry import RasVolume
    from TrajectoryPlannerLib.planning.risk import RiskModel, RiskStructure

    sp = np.array([1.0, 1.0, 2.0])  # i, j, k mm
    grid = RasVolume(np.zeros((11, 21, 21), np.int16), np.diag([*sp, 1.0]), "g")
    mask = np.zeros(grid.array.shape, bool)
    mask[5, 10, 10] = True
    body = np.ones_like(mask)
    maps = engine.DistanceMaps(RiskModel(grid, body, body, [RiskStructure("x", mask, 5.0)]), cap_mm=30.0)
    # 3 voxels along i and 2 along k from the voxel centre: box faces at 0.5 mm (i) and 1 mm (k)
    kji = np.array([[7.0, 10.0, 13.0]])
    centre = np.hypot(3.0, 4.0)
    surface = np.hypot(2.5, 3.0)
    assert maps.exact_distance("x", kji)[0] == pytest.approx(centre)
    assert maps.surface_distance_min("x", kji) == pytest.approx(surface)
    assert maps.surface_offset_mm == pytest.approx(0.5 * np.linalg.norm(sp))


def _masks():
    rng = np.random.default_rng(3)
    m = ndimage.binary_dilation(rng.random((30, 40, 50)) < 0.002, iterations=2)
    m[0, :5, :5] = True  # touching the array border
    return m


def test_edt_and_simpleitk_distance_maps_agree():
    pytest.importorskip("edt")
    m = _masks()
    sp = (2.0, 0.78, 0.78)
    a = engine.distance_map(m, sp, threads=2, backend="edt")
    b = engine.distance_map(m, sp, threads=2, backend="sitk")
    exact = ndimage.distance_transform_edt(~m, sampling=sp)
    assert a.dtype == b.dtype == np.float32
    assert np.abs(a - exact).max() < 1e-3 and np.abs(b - exact).max() < 1e-3
    assert np.abs(a - b).max() < 1e-3
    assert (a[m] == 0).all() and (b[m] == 0).all()


def test_without_edt_the_simpleitk_maps_are_used_and_logged(monkeypatch, caplog):
    m = _masks()
    sp = (2.0, 0.78, 0.78)
    monkeypatch.setitem(sys.modules, "edt", None)  # import edt -> ImportError, as in desktop Slicer
    monkeypatch.setattr(engine, "_EDT_NOTE_LOGGED", False)
    with caplog.at_level(logging.INFO, logger=engine.logger.name):
        d = engine.distance_map(m, sp, threads=1)
    assert "'edt' package is not installed" in caplog.text
    exact = ndimage.distance_transform_edt(~m, sampling=sp)
    assert np.abs(d - exact).max() < 1e-3
    with pytest.raises(engine.TrajectoryPlannerError, match="edt"):
        engine.distance_map(m, sp, backend="edt")

"""Planner engine on a synthetic abdomen, verified by an independent dense ray-march (KD-tree distances)."""
import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from planner_oracle import Oracle
from TrajectoryPlannerLib.planning import engine, needles, risk
from SmartBiopsyCoreLib.phantom import abdomen as synthetic
from TrajectoryPlannerLib.errors import TrajectoryPlannerError

# planner structure name -> label values of the synthetic abdomen; automatic 'bone'/'gas' come from HU and
# coincide with labels 3 and 8 there.
ORACLE_LABELS = {"bone": (3,), "gas": (8,), "aorta": (4,), "ivc": (5,), "kidney": (6,), "bowel": (7,),
                 "bowel_gas": (8,)}


@pytest.fixture(scope="module")
def abdomen():
    return synthetic.make_abdomen()


@pytest.fixture(scope="module")
def oracle(abdomen):
    return Oracle(abdomen[1], ORACLE_LABELS)


@pytest.fixture(scope="module")
def oblique_plan(abdomen):
    ct, labels, targets = abdomen
    return engine.plan(ct, targets, labelmaps=[(labels, synthetic.RISK_LABELS)])


def _assert_safe(tr, oracle, needle, bound):
    d = oracle.axis_surface_distances(tr.entry_ras, tr.tip_ras)  # to voxel surfaces, the planner's definition
    for name, dist in d.items():
        surface = dist - needle.outer_radius_mm
        assert surface >= tr.margin_mm[name] - 1e-6, (tr.name, name, surface)
        # the reported clearance is a lower bound, and not looser than twice the stated bound
        assert tr.clearance_mm[name] <= surface + 1e-6, (tr.name, name)
        # exact at 0.5 mm samples minus step/2 (the 0.1 mm march may miss the minimum by <= 0.05 mm)
        assert tr.clearance_mm[name] >= surface - 0.25 - 0.05, (tr.name, name)
    assert not oracle.leaves_body(tr.entry_ras, tr.target_ras)


def test_every_returned_path_clears_every_structure_by_its_margin(oblique_plan, oracle):
    r = oblique_plan
    assert {t.target for t in r.trajectories} == {"A", "B", "C"}
    assert len(r.trajectories) == 15
    for tr in r.trajectories + (r.shared_entry.trajectories if r.shared_entry else []):
        _assert_safe(tr, oracle, r.needle, r.error_bound_mm)
        assert tr.length_mm <= r.needle.max_reach_mm + 1e-9
        assert abs(np.linalg.norm(tr.target_ras - tr.entry_ras) - tr.length_mm) < 1e-6


def test_error_bound_is_half_voxel_diagonal_plus_half_step(oblique_plan, abdomen):
    sp = abdomen[0].spacing
    assert oblique_plan.error_bound_mm == pytest.approx(0.5 * np.linalg.norm(sp) + 0.25)
    d = oblique_plan.to_dict()
    assert d["clearance_surface_offset_mm"] == pytest.approx(0.5 * np.linalg.norm(sp), abs=1e-3)
    assert "voxel surfaces, not centres" in d["clearance_definition"]


def test_ranks_are_ordered_by_score_and_entries_are_separated(oblique_plan):
    for t in "ABC":
        trs = sorted([tr for tr in oblique_plan.trajectories if tr.target == t], key=lambda tr: tr.rank)
        assert [tr.rank for tr in trs] == list(range(1, len(trs) + 1))
        assert all(a.score >= b.score - 1e-12 for a, b in zip(trs, trs[1:]))
        for a in trs:
            for b in trs:
                if a is not b:
                    assert np.linalg.norm(a.entry_ras - b.entry_ras) >= 10.0 - 1e-9


def test_no_entry_on_the_table_side(oblique_plan):
    excl = risk.EntryExclusion()
    for tr in oblique_plan.trajectories:
        u = (tr.entry_ras - tr.target_ras) / tr.length_mm
        assert math.degrees(math.acos(u @ np.array([0, -1.0, 0]))) >= 60.0 - 1e-6
        assert not excl.excluded(tr.target_ras, tr.entry_ras[None])[0]


def test_rejection_funnel_accounts_for_every_candidate(oblique_plan):
    r = oblique_plan
    for t in "ABC":
        n_valid_or_rejected = sum(r.rejections[t].values())
        assert 0 < n_valid_or_rejected < r.candidates[t]
        assert r.rejections[t].get("entry_region", 0) > 0 and r.rejections[t].get("needle_length", 0) > 0


def test_shared_entry_is_one_point_and_reports_the_tradeoff(oblique_plan):
    s = oblique_plan.shared_entry
    assert s is not None
    assert len(s.trajectories) == 3
    for tr in s.trajectories:
        assert np.allclose(tr.entry_ras, s.entry_ras)
        best = next(b for b in oblique_plan.trajectories if b.target == tr.target and b.rank == 1)
        assert s.tradeoff[tr.target]["score_loss"] == pytest.approx(best.score - tr.score, abs=1e-3)
        assert s.tradeoff[tr.target]["score_loss"] >= -1e-9
    assert 0 < s.fan_angle_deg < 180


def test_plan_serialises_to_the_documented_json_shape(oblique_plan):
    d = json.loads(json.dumps(oblique_plan.to_dict()))
    assert set(d) >= {"targets", "trajectories", "shared_entry", "rejections"}
    t0 = d["trajectories"][0]
    assert set(t0) >= {"name", "region", "entry_ras", "target_ras", "needle", "length_mm", "clearance_mm",
                       "angle_to_axial_deg", "score", "rank"}


def test_in_plane_mode_keeps_paths_in_the_target_axial_plane(abdomen, oracle):
    ct, labels, targets = abdomen
    s = engine.PlanSettings(mode="in-plane", in_plane_tolerance_deg=1.0, top_n=3)
    r = engine.plan(ct, targets[1:], labelmaps=[(labels, synthetic.RISK_LABELS)], settings=s)  # A lies in a rib slab
    assert r.trajectories
    for tr in r.trajectories:
        assert tr.angle_to_axial_deg <= 1.0 + 1e-9
        assert abs(tr.entry_ras[2] - tr.target_ras[2]) <= tr.length_mm * math.sin(math.radians(1.0)) + 1e-6
        _assert_safe(tr, oracle, r.needle, r.error_bound_mm)


def test_oblique_mode_respects_the_maximum_angle(abdomen):
    ct, labels, targets = abdomen
    s = engine.PlanSettings(max_angle_deg=10.0, top_n=5, shared_entry=False)
    r = engine.plan(ct, targets[:1], labelmaps=[(labels, synthetic.RISK_LABELS)], settings=s)
    assert all(tr.angle_to_axial_deg <= 10.0 + 1e-9 for tr in r.trajectories)
    assert r.rejections["A"].get("angle_to_axial", 0) > 0


def test_no_safe_path_says_which_constraint_removed_how_many(abdomen):
    ct, labels, targets = abdomen
    with pytest.raises(engine.NoSafePathError) as e:
        engine.plan(ct, targets[:1], labelmaps=[(labels, synthetic.RISK_LABELS)], margins={"bone": 60.0},
                    settings=engine.PlanSettings(shared_entry=False))
    msg = str(e.value)
    f = e.value.rejections
    assert f.get("clearance:bone", 0) > 0
    assert f"{f['clearance:bone']} too close to bone" in msg
    assert f"{f['entry_region']} in the excluded entry region" in msg


def test_a_field_of_view_cut_inside_the_body_says_there_is_no_skin_to_enter_from(abdomen):
    from SmartBiopsyCoreLib.geometry import RasVolume

    ct, _, targets = abdomen
    k, j, i = np.round(ct.ras_to_ijk_points(np.asarray(targets[0]["point_ras"], float)[None])[0][::-1]).astype(int)
    lo = np.array([k - 8, j - 15, i - 15])
    m = ct.ijk_to_ras.copy()
    m[:3, 3] = ct.kji_to_ras_points(lo[None])[0]
    crop = RasVolume(ct.array[k - 8:k + 9, j - 15:j + 16, i - 15:i + 16].copy(), m, "cropped inside the body")
    for mode, where in (("oblique", "on the CT"), ("in-plane", "on the target's axial slice")):
        with pytest.raises(engine.NoSafePathError, match=f"no skin was found {where} to enter from; check that the "
                                                         "CT shows the whole body outline"):
            engine.plan(crop, targets[:1], settings=engine.PlanSettings(mode=mode, shared_entry=False))


def test_target_outside_the_body_or_inside_bone_is_a_clear_error(abdomen):
    ct, labels, _ = abdomen
    with pytest.raises(TrajectoryPlannerError, match="outside the body"):
        engine.plan(ct, [{"name": "X", "point_ras": [0.0, 112.0, 0.0]}])  # just anterior of the skin
    with pytest.raises(TrajectoryPlannerError, match="inside bone"):
        engine.plan(ct, [{"name": "S", "point_ras": [0.0, -75.0, 0.0]}])  # vertebral body
    with pytest.raises(TrajectoryPlannerError, match="outside the CT"):
        engine.plan(ct, [{"name": "Far", "point_ras": [0.0, 0.0, 500.0]}])
    with pytest.raises(TrajectoryPlannerError, match="point_ras"):
        engine.plan(ct, [{"name": "Bad"}])


def test_needle_too_short_says_the_length_needed(abdomen, oracle):
    ct, labels, targets = abdomen
    core = needles.CoreNeedle(18, 1.27, 60.0, 20.0, 5.0, 22.0)
    short = needles.NeedleModel("short", core, needles.CoaxialIntroducer(17, 1.473, 30.0))
    with pytest.raises(engine.NoSafePathError) as e:
        engine.plan(ct, targets[:1], short, labelmaps=[(labels, synthetic.RISK_LABELS)])
    needed = e.value.needed_length_mm
    assert needed is not None and needed > short.max_reach_mm
    assert f"at least {math.ceil(needed)} mm" in str(e.value)
    # a needle with that reach succeeds, and its best path is no shorter than the stated need
    intro = needles.CoaxialIntroducer(17, 1.473, math.ceil(needed) - short.pre_fire_gap_mm + 0.5)
    ok = needles.NeedleModel("ok", core.__class__(18, 1.27, 200.0, 20.0, 5.0, 22.0), intro)
    r = engine.plan(ct, targets[:1], ok, labelmaps=[(labels, synthetic.RISK_LABELS)])
    assert min(tr.length_mm for tr in r.trajectories) >= needed - 1e-6


def test_cancel_stops_planning(abdomen):
    ct, _, targets = abdomen
    with pytest.raises(TrajectoryPlannerError, match="cancelled"):
        engine.plan(ct, targets, should_cancel=lambda: True)


def test_distance_maps_equal_exact_edt_and_trilinear_stays_within_the_bound(abdomen):
    ct, labels, _ = abdomen
    sub = risk.crop_volume(ct, (20, 40, 40), (60, 160, 200))
    rm = risk.build_risk_model(sub, [(risk.crop_volume(labels, (20, 40, 40), (60, 160, 200)), {6: "kidney"})],
                               auto=False)
    maps = engine.DistanceMaps(rm, cap_mm=30.0)
    kid = rm.structure("kidney")
    assert maps.groups == [(5.0, ["kidney"])]
    lo, d = maps.maps[0]
    exact = ndimage.distance_transform_edt(~kid.mask, sampling=sub.spacing[::-1])
    region = exact[lo[0]:lo[0] + d.shape[0], lo[1]:lo[1] + d.shape[1], lo[2]:lo[2] + d.shape[2]]
    sel = (region < 30) & (region > 0)
    assert np.abs(d[sel] - region[sel]).max() < 1e-3
    # trilinear reading vs exact KD-tree distance at random off-grid points
    tree = cKDTree(sub.voxel_centres_ras(kid.mask))
    rng = np.random.default_rng(1)
    kji = rng.uniform([0, 0, 0], np.array(sub.array.shape) - 1, size=(5000, 3))
    ras = sub.kji_to_ras_points(kji)
    true = tree.query(ras)[0]
    interp = maps.sample_group(0, kji)
    h = maps.half_diagonal_mm
    exact_kd = maps.exact_distance("kidney", kji)  # boundary-voxel KD-tree, 0 inside
    far = true > h
    assert np.allclose(exact_kd[far], true[far], atol=1e-6)
    ok = true < 25
    assert ok.sum() > 500
    assert np.all(interp[ok] - h <= true[ok] + 1e-4)  # the conservative side, everywhere
    out = ok & (true > 2 * h)  # inside a structure the map is signed (negative), the KD-tree is not
    assert np.all(interp[out] + h >= true[out] - 1e-4)


def test_pooled_planning_grid_stays_safe_with_the_larger_bound(abdomen, oracle):
    ct, labels, targets = abdomen
    s = engine.PlanSettings(planning_spacing_mm=3.0, top_n=3)
    r = engine.plan(ct, targets, labelmaps=[(labels, synthetic.RISK_LABELS)], settings=s)
    # blocks of 2 x 2 x 1 fine voxels (1.5, 1.5, 2 mm): offset 0.5 * |(1.5, 1.5, 0)|
    coarse_h = 0.5 * np.linalg.norm([3.0, 3.0, 2.0])
    # to voxel surfaces: a pooled voxel's box holds its fine voxels' boxes, so no separate pooling offset
    assert r.error_bound_mm == pytest.approx(coarse_h + 0.25)
    assert r.surface_offset_mm == pytest.approx(coarse_h)
    assert len(r.trajectories) == 9
    for tr in r.trajectories + r.shared_entry.trajectories:
        d = oracle.axis_surface_distances(tr.entry_ras, tr.tip_ras)
        for name, dist in d.items():
            assert dist - r.needle.outer_radius_mm >= tr.margin_mm[name] - 1e-6, (tr.name, name)
            assert tr.clearance_mm[name] <= dist - r.needle.outer_radius_mm + 1e-6


def test_plan_keeps_the_positional_order_the_module_logic_uses():
    import inspect
    names = list(inspect.signature(engine.plan).parameters)
    assert names[:10] == ["ct", "targets", "needle", "labelmaps", "margins", "settings", "exclusion",
                          "auto_structures", "progress", "should_cancel"]


def test_paths_that_leave_the_body_are_rejected(abdomen):
    ct, labels, targets = abdomen
    # an air-filled groove open to the outside (like the gap between arm and flank), anterior-left
    x = ct.kji_to_ras_points(np.argwhere(np.ones(ct.array.shape[1:], bool)[None]))  # one slice is enough
    lab = labels.array.copy()
    hu = ct.array.copy()
    xs = x[:, 0].reshape(ct.array.shape[1:])
    ys = x[:, 1].reshape(ct.array.shape[1:])
    groove = (np.abs(xs + 105.0) < 3.0) & (ys > 30.0)
    lab[:, groove] = 0
    hu[:, groove] = -1000
    ct2, lab2 = ct.with_array(hu), labels.with_array(lab)
    r = engine.plan(ct2, targets[:1], labelmaps=[(lab2, synthetic.RISK_LABELS)],
                    settings=engine.PlanSettings(shared_entry=False, top_n=5))
    assert r.rejections["A"].get("leaves_body", 0) > 50
    o = Oracle(lab2, {"bone": (3,)}, outside_values=(0, 11))
    for tr in r.trajectories:
        assert not o.leaves_body(tr.entry_ras, tr.target_ras), tr.name


def test_combined_field_of_several_margin_groups_equals_whole_grid_transforms_capped_at_the_cap():
    """Each group's map is limited (box and cap) to the distances that can lower V; V must still equal
    min over groups of (whole-grid exact distance capped at the cap - margin) on the path domain."""
    from SmartBiopsyCoreLib.geometry import RasVolume

    rng = np.random.default_rng(7)
    shape = (30, 70, 80)
    sp_ijk = np.array([0.8, 0.8, 1.5])
    grid = RasVolume(np.zeros(shape, np.int16), np.diag([*sp_ijk, 1.0]), "g")
    structures = []
    for name, margin, centre in (("bone", 3.0, (5, 10, 10)), ("gas", 5.0, (25, 60, 70)), ("kidney", 5.0, (15, 35, 5)),
                                 ("aorta", 10.0, (12, 66, 40)), ("ivc", 10.0, (3, 30, 75))):
        m = np.zeros(shape, bool)
        c = np.array(centre)
        m[tuple(slice(max(0, v - 2), v + 3) for v in c)] = True
        m &= rng.random(shape) < 0.8
        structures.append(risk.RiskStructure(name, m, margin))
    body = np.ones(shape, bool)
    rm = risk.RiskModel(grid, body, body, structures)
    domain = (np.array([4, 20, 20]), np.array([26, 50, 60]))
    maps = engine.DistanceMaps(rm, cap_mm=30.0, domain=domain)
    sl = tuple(slice(a, b) for a, b in zip(*domain))
    ref = np.full(maps.combined.shape, np.inf)
    for margin in (3.0, 5.0, 10.0):
        union = np.any([s.mask for s in structures if s.margin_mm == margin], axis=0)
        d = ndimage.distance_transform_edt(~union, sampling=sp_ijk[::-1])[sl]
        ref = np.minimum(ref, np.minimum(d, 30.0) - margin)
    assert np.abs(maps.combined - ref).max() < 1e-4
    assert (ref < 30.0 - 10.0).mean() > 0.5  # most of the domain is within reach of some structure


def test_far_apart_structures_of_one_margin_get_separate_map_boxes_and_the_same_field():
    """Two structures of one margin group at opposite ends of the grid: their distance maps are computed on two
    small boxes (not one box spanning both), and V on the domain, the group map and the margin group attaining V
    still equal the whole-grid exact transform of the union capped at the cap."""
    from SmartBiopsyCoreLib.geometry import RasVolume

    shape = (16, 40, 220)
    sp_ijk = np.array([0.8, 0.8, 1.5])
    grid = RasVolume(np.zeros(shape, np.int16), np.diag([*sp_ijk, 1.0]), "g")
    masks = {}
    for name, sl in (("left", np.s_[4:10, 10:20, 5:15]), ("right", np.s_[6:12, 18:30, 200:212]),
                     ("middle", np.s_[2:6, 30:36, 105:112])):
        m = np.zeros(shape, bool)
        m[sl] = True
        masks[name] = m
    structures = [risk.RiskStructure("left", masks["left"], 5.0), risk.RiskStructure("right", masks["right"], 5.0),
                  risk.RiskStructure("middle", masks["middle"], 3.0)]
    rm = risk.RiskModel(grid, np.ones(shape, bool), np.ones(shape, bool), structures)
    domain = (np.array([0, 5, 0]), np.array([16, 35, 220]))
    maps = engine.DistanceMaps(rm, cap_mm=30.0, domain=domain)
    gi = [m for m, _ in maps.groups].index(5.0)
    assert len(maps.pieces[gi]) == 2  # far apart: two boxes, each much narrower than the grid
    assert all(d.shape[2] < shape[2] // 2 for _, d in maps.pieces[gi])
    sl = tuple(slice(a, b) for a, b in zip(*domain))
    ref = np.full(maps.combined.shape, 30.0 - 5.0)
    group_ref = {}
    for margin, cap in ((3.0, 28.0), (5.0, 30.0)):  # group caps: cap - largest margin + margin
        union = np.any([s.mask for s in structures if s.margin_mm == margin], axis=0)
        group_ref[margin] = np.minimum(ndimage.distance_transform_edt(~union, sampling=sp_ijk[::-1]), cap)
        ref = np.minimum(ref, group_ref[margin][sl] - margin)
    assert np.abs(maps.combined - ref).max() < 1e-4
    # the margin group attaining V where one group is strictly lower
    v3, v5 = group_ref[3.0][sl] - 3.0, group_ref[5.0][sl] - 5.0
    clear = np.abs(v3 - v5) > 1e-3
    assert np.array_equal(maps.argmin[clear], np.where(v3 < v5, 0, 1)[clear].astype(np.uint8))
    # the assembled group map equals the capped union transform on the domain
    lo, d = maps.maps[gi]
    box = tuple(slice(max(a, b), min(a + n, c)) for a, b, n, c in zip(lo, domain[0], d.shape, domain[1]))
    got = d[tuple(slice(s.start - a, s.stop - a) for s, a in zip(box, lo))]
    assert np.abs(got - group_ref[5.0][box]).max() < 1e-4

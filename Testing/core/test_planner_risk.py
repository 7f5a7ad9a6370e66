"""Risk structures from CT and label maps, skin, table-side exclusion."""
import numpy as np
import pytest

from SmartBiopsyCoreLib.geometry import RasVolume
from TrajectoryPlannerLib.planning import risk
from SmartBiopsyCoreLib.phantom import abdomen as synthetic
from TrajectoryPlannerLib.errors import TrajectoryPlannerError


@pytest.fixture(scope="module")
def abdomen():
    return synthetic.make_abdomen(spacing=(2.0, 2.0, 2.0), fov_mm=(360, 300, 80))


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_body_excludes_the_table_and_fills_internal_gas(abdomen):
    ct, labels, _ = abdomen
    body = risk.body_mask(ct)
    lab = labels.array
    assert not body[lab == 11].any()
    assert body[lab == 8].all()  # bowel gas is inside the body
    assert _dice(body, (lab != 0) & (lab != 11)) > 0.99


def test_body_hole_filling_survives_a_crop_through_the_gas(abdomen):
    ct, labels, _ = abdomen
    # make the bowel gas run through the whole crop in z: it touches the top and bottom faces
    a = ct.array.copy()
    a[labels.array == 8] = -1000
    x = ct.with_array(a)
    body = risk.body_mask(x)
    assert body[labels.array == 8].all()


def test_skin_is_the_body_surface_but_not_the_crop_faces(abdomen):
    ct, labels, _ = abdomen
    body = risk.body_mask(ct)
    skin = risk.skin_mask(body)
    from scipy import ndimage
    interior = ndimage.binary_erosion(body[0], iterations=2)  # inside the first slice, away from its edge
    assert interior.sum() > 1000 and not skin[0][interior].any()
    pts = ct.voxel_centres_ras(skin)
    r = np.hypot(pts[:, 0] / 150.0, pts[:, 1] / 110.0)
    assert np.all(r > 0.95) and np.all(r <= 1.01)


def test_automatic_bone_and_gas_match_the_labels_and_drop_noise(abdomen):
    ct, labels, _ = abdomen
    a = ct.array.copy()
    rng = np.random.default_rng(0)
    noise = (rng.random(a.shape) < 0.0005) & (labels.array == 1)
    a[noise] = 900  # isolated bright voxels (noise, tiny calcifications)
    noisy = ct.with_array(a)
    body = risk.body_mask(noisy)
    s = {st.name: st for st in risk.auto_structures(noisy, body)}
    assert _dice(s["bone"].mask, labels.array == 3) > 0.98
    assert _dice(s["gas"].mask, labels.array == 8) > 0.95
    assert s["bone"].margin_mm == 3.0 and s["gas"].margin_mm == 5.0


def test_user_label_maps_get_default_margins_and_overrides(abdomen):
    ct, labels, _ = abdomen
    st = risk.structures_from_labelmap(labels, ct, synthetic.RISK_LABELS, margins={"kidney": 7.5})
    m = {s.name: s.margin_mm for s in st}
    assert m["aorta"] == 10 and m["ivc"] == 10 and m["bowel"] == 5 and m["bone"] == 3 and m["kidney"] == 7.5
    unnamed = risk.structures_from_labelmap(labels, ct, None)
    assert {s.name for s in unnamed} >= {"label_4", "label_9"}
    assert all(s.margin_mm == risk.GENERIC_MARGIN_MM for s in unnamed)


def test_label_map_on_another_grid_is_resampled(abdomen):
    ct, labels, _ = abdomen
    coarse = RasVolume(labels.array[:, ::2, ::2], labels.ijk_to_ras @ np.diag([2, 2, 1, 1]), "coarse")
    st = {s.name: s for s in risk.structures_from_labelmap(coarse, ct, {4: "aorta"})}
    assert st["aorta"].mask.shape == ct.array.shape
    assert _dice(st["aorta"].mask, labels.array == 4) > 0.7


def test_table_side_exclusion_cone_and_azimuth():
    tgt = np.zeros(3)
    entries = np.array([[0, -100, 0], [100, 0, 0], [0, 100, 0], [70, -80, 0]], float)
    cone = risk.EntryExclusion.for_patient_position("supine")
    assert cone.excluded(tgt, entries).tolist() == [True, False, False, True]
    prone = risk.EntryExclusion.for_patient_position("prone")
    assert prone.excluded(tgt, entries).tolist() == [False, False, True, False]
    az = risk.EntryExclusion(kind="azimuth", azimuth_range_deg=(135, 225))
    assert az.excluded(tgt, entries).tolist() == [True, False, False, True]
    assert risk.EntryExclusion.for_patient_position("none") is None
    with pytest.raises(TrajectoryPlannerError):
        risk.EntryExclusion.for_patient_position("standing")


def test_rejects_a_ct_that_is_not_in_hounsfield_units(abdomen):
    ct, _, _ = abdomen
    shifted = ct.with_array((ct.array.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16) // 40)
    with pytest.raises(TrajectoryPlannerError, match="Hounsfield"):
        risk.build_risk_model(shifted)
    with pytest.raises(TrajectoryPlannerError, match="no body"):
        risk.build_risk_model(ct.with_array(np.full(ct.array.shape, -1000, np.int16)))


def test_structures_built_in_a_region_equal_the_whole_grid_ones_there(abdomen):
    ct, labels, _ = abdomen
    body = risk.body_mask(ct)
    lo, hi = np.array([5, 20, 30]), np.array([35, 120, 150])
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    whole = {s.name: s.mask for s in risk.auto_structures(ct, body)}
    part = {s.name: s.mask for s in risk.auto_structures(ct, body, region=(lo, hi))}
    assert set(part) == set(whole) == {"bone", "gas"}
    for name in part:
        assert not part[name][~np.pad(np.ones(hi - lo, bool), [(a, n - b) for a, b, n in zip(lo, hi, ct.array.shape)])].any()
        assert np.array_equal(part[name][box], whole[name][box]), name
    lw = {s.name: s.mask for s in risk.structures_from_labelmap(labels, ct, synthetic.RISK_LABELS)}
    lp = {s.name: s.mask for s in risk.structures_from_labelmap(labels, ct, synthetic.RISK_LABELS, region=(lo, hi))}
    for name in lp:
        assert np.array_equal(lp[name][box], lw[name][box]) and lp[name].sum() == lp[name][box].sum()


def test_a_small_component_cut_by_the_region_is_kept(abdomen):
    ct, _, _ = abdomen
    a = ct.array.copy()
    body = risk.body_mask(ct)
    k, j, i = np.argwhere(body & (a < 0) & (a > -200))[len(a) // 2]  # a fat voxel well inside the body
    a[k, j, i:i + 4] = 900  # 4 bright voxels (32 mm³ < 50 mm³): noise on the whole grid
    x = ct.with_array(a)
    assert not any(s.name == "bone" and s.mask[k, j, i] for s in risk.auto_structures(x, body))
    cut = (np.array([0, 0, 0]), np.array([a.shape[0], a.shape[1], i + 2]))  # the region cuts the blob
    part = {s.name: s.mask for s in risk.auto_structures(x, body, region=cut)}
    assert part["bone"][k, j, i] and part["bone"][k, j, i + 1]


def test_six_neighbour_erosion_and_dilation_equal_the_padded_definition():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    cross = ndimage.generate_binary_structure(3, 1)
    for shape in ((1, 5, 7), (9, 10, 11), (20, 1, 6)):
        for frac in (0.3, 0.8):
            m = rng.random(shape) < frac
            p_edge = np.pad(m, 1, mode="edge")
            p_zero = np.pad(m, 1, constant_values=False)
            inner = (slice(1, -1),) * 3
            assert np.array_equal(risk._erode6(m, edge=True), ndimage.binary_erosion(p_edge, cross)[inner])
            assert np.array_equal(risk._erode6(m, edge=False), ndimage.binary_erosion(p_zero, cross)[inner])
            assert np.array_equal(risk._dilate6(m), ndimage.binary_dilation(p_zero, cross)[inner])
            view = m[:, ::-1, 1:]  # not contiguous
            assert np.array_equal(risk._erode6(view, edge=False),
                                  ndimage.binary_erosion(np.pad(view, 1, constant_values=False), cross)[inner])


def _reference_auto(a, body, spacing, region, min_mm3=50.0):
    """Bone and gas as defined in the module docstring, computed on the whole region with scipy (no boxes)."""
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(3, 1)
    lo, hi = (np.asarray(v) for v in region) if region is not None else (np.zeros(3, int), np.array(a.shape))
    glo, ghi = np.maximum(lo - 2, 0), np.minimum(hi + 2, a.shape)
    box = tuple(slice(x, y) for x, y in zip(glo, ghi))
    touching = [(g > 0, h < n) for g, h, n in zip(glo, ghi, a.shape)] if region is not None else [(False, False)] * 3
    min_vox = int(np.ceil(min_mm3 / np.prod(spacing)))

    def keep(mask):
        lab, _ = ndimage.label(mask, cross)
        k = np.bincount(lab.ravel()) >= min_vox
        for ax, (flo, fhi) in enumerate(touching):
            for flag, idx in ((flo, 0), (fhi, -1)):
                if flag:
                    k[np.unique(np.take(lab, idx, axis=ax))] = True
        k[0] = False
        return k[lab]

    sub, b = a[box], body[box]
    bone = keep((sub > 200) & b)
    gas = (sub < -400) & b
    opened = ndimage.binary_dilation(ndimage.binary_erosion(np.pad(gas, 1, mode="edge"), cross)[1:-1, 1:-1, 1:-1], cross) & gas
    gas = keep(opened)
    out = {}
    for name, m in (("bone", bone), ("gas", gas)):
        full = np.zeros(a.shape, bool)
        full[box] = m
        inside = np.zeros(a.shape, bool)
        inside[tuple(slice(x, y) for x, y in zip(lo, hi))] = True
        out[name] = full & inside
    return out


@pytest.mark.parametrize("region, confined", [(None, False), (((3, 5, 7), (25, 40, 52)), False),
                                              (((0, 10, 0), (30, 45, 33)), False), (((2, 3, 4), (28, 48, 58)), True)])
def test_automatic_bone_and_gas_equal_the_whole_region_definition_on_a_random_ct(region, confined):
    """``confined``: bone and gas only in a block inside the region, so that their boxes are smaller than it."""
    from scipy import ndimage

    rng = np.random.default_rng(11)
    shape = (30, 50, 60)
    a = np.full(shape, 40.0)
    f = ndimage.gaussian_filter(rng.random(shape), 1.5)
    a[f > np.quantile(f, 0.93)] = 500.0  # bone blobs of many sizes
    g = ndimage.gaussian_filter(rng.random(shape), 1.2)
    a[g < np.quantile(g, 0.05)] = -800.0  # gas pockets of many sizes
    a[rng.random(shape) < 0.003] = -900.0  # one-voxel gas noise
    a[rng.random(shape) < 0.003] = 700.0  # one-voxel bone noise
    if confined:
        block = np.zeros(shape, bool)
        block[5:25, 10:45, 8:50] = True
        a[~block] = 40.0
    body = np.ones(shape, bool)
    body[:, :3] = False
    ct = RasVolume(a.astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0]), "ct")
    got = {s.name: s.mask for s in risk.auto_structures(ct, body, region=region)}
    ref = _reference_auto(a, body, ct.spacing, region)
    for name in ("bone", "gas"):
        assert ref[name].sum() > 100
        assert np.array_equal(got[name], ref[name]), name


def test_a_user_label_replaces_its_automatic_namesake_and_the_other_stays_automatic(abdomen):
    """A user 'bone' label replaces the automatic bone (which is then not built at all); gas, not given by the
    user, stays automatic; without labels both come from the CT."""
    ct, labels, _ = abdomen
    auto = {s.name: s for s in risk.build_risk_model(ct).structures}
    assert auto["bone"].source == "ct" and auto["gas"].source == "ct"
    user_bone = np.where(labels.array == 3, 3, 0).astype(np.uint8)
    user_bone[:, :, : user_bone.shape[2] // 2] = 0  # half of it: differs from the automatic bone
    rm = risk.build_risk_model(ct, [(labels.with_array(user_bone), {3: "bone"})])
    got = {s.name: s for s in rm.structures}
    assert [s.name for s in rm.structures].count("bone") == 1
    assert got["bone"].source == "user" and np.array_equal(got["bone"].mask, user_bone == 3)
    assert got["gas"].source == "ct" and np.array_equal(got["gas"].mask, auto["gas"].mask)

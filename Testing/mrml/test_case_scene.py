"""The case scene as a reader opens it (scene_build on a real headless MRML scene, small in-memory case).

Checks what issue 19 found wrong in the demo's scene.mrb: one visible chosen path per target, the other
candidates and the shared-entry paths hidden in a sub-folder, the planned notch tip and the target as separate
named points, the tumour and the organs at risk as one segmentation node, one palette colour per habitat in the
habitat segmentation, the target points and the paths.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("slicer", reason="the Slicer MRML libraries (slicer-core) are not installed")

from SmartBiopsyCoreLib import palette  # noqa: E402
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid  # noqa: E402


def _rot_z(deg):
    a = np.radians(deg)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return m


@pytest.fixture(scope="module")
def case_run():
    """A finished run's in-memory results on the synthetic abdomen (coarse grids; RAS mm)."""
    from SmartBiopsyCoreLib.phantom import abdomen as synthetic
    from SmartBiopsyLib.characterise import habitats, targets
    from SmartBiopsyLib.sampling import notch
    from SmartBiopsyLib.sampling.needle import NeedleDetection, placement_error
    from TrajectoryPlannerLib.planning import engine

    ct, labels, _ = synthetic.make_abdomen(spacing=(3.0, 3.0, 4.0), fov_mm=(360.0, 300.0, 120.0))
    mri_to_ct = _rot_z(4.0)
    mri_to_ct[:3, 3] = [6.0, -4.0, 3.0]
    centre_mri = (np.linalg.inv(mri_to_ct) @ np.r_[synthetic.TUMOUR_CENTRE_RAS, 1.0])[:3]
    n, sp = (40, 40, 14), (2.0, 2.0, 5.0)
    grid = make_grid(centre_mri - 0.5 * np.array(sp) * (np.array(n) - 1), sp, n[::-1])
    kk, jj, ii = np.indices(n[::-1])
    ras = RasVolume(np.zeros(n[::-1]), grid).ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1))
    rel = (ras - centre_mri).reshape(n[::-1] + (3,))
    tum = np.linalg.norm(rel, axis=-1) <= synthetic.TUMOUR_RADIUS_MM - 2
    maps = {"adc": RasVolume(np.where(tum, 1200.0 + 25.0 * rel[..., 0], 2000.0).astype(np.float32), grid, "adc"),
            "ef": RasVolume(np.where(tum, 40.0 + 1.2 * rel[..., 1], 5.0).astype(np.float32), grid, "ef"),
            "ff": RasVolume(np.where(tum, 3.0 + 0.1 * rel[..., 2] ** 2 / 10, 60.0).astype(np.float32), grid, "ff")}
    hab = habitats.compute_habitats(maps["adc"], maps["ef"], maps["ff"], tum,
                                    habitats.HabitatConfig(min_region_ml=0.2, island_min_ml=0.05))
    ts = targets.plan_targets(hab.labels, maps, 1.0)
    assert {t.region for t in ts} == {"A", "B", "C"}
    tct = {t.region: (mri_to_ct @ np.r_[t.point_ras, 1.0])[:3] for t in ts}
    plan = engine.plan(ct, [{"name": t.region, "region": t.region, "point_ras": tct[t.region]} for t in ts],
                       labelmaps=[(labels, synthetic.RISK_LABELS)],
                       settings=engine.PlanSettings(entry_spacing_mm=9.0, top_n=3, threads=1))
    best = [min((t for t in plan.trajectories if t.target == r), key=lambda t: t.rank) for r in ("A", "B", "C")]
    samples = []
    for t in best:
        e, g = np.asarray(t.entry_ras), np.asarray(t.tip_ras if t.tip_ras is not None else t.target_ras)
        d = (g - e) / np.linalg.norm(g - e)
        lat = np.cross(d, [0, 0, 1.0])
        tip = g + lat / np.linalg.norm(lat)
        pe = placement_error(e, g, tip, d)
        det = NeedleDetection(t.target, tip, d, e + 5 * d, float(np.linalg.norm(tip - e)) - 5, e, g,
                              pe.tip_error_mm, pe.lateral_error_mm, pe.depth_error_mm, pe.angle_deg,
                              pe.lateral_vector_ras, 0.3, 2800.0, 40.0, 1500.0, 15.0, 120)
        samples.append((t, det, notch.notch_roi(tip, d, notch.TIP_DISTAL, target_name=t.target), None))
    tumour = RasVolume(tum.astype(np.uint8), grid, "tumour")
    inputs = SimpleNamespace(ct=ct, mri_anatomical=None, dce=None, tumour=tumour,
                             risk_labelmaps=[(labels, synthetic.RISK_LABELS)])
    results = {"maps": {}, "mri_to_ct": mri_to_ct, "fusion": None, "habitats": hab, "targets": ts,
               "tumour": tumour, "plan": plan, "best_trajectories": best, "samples": samples}
    return SimpleNamespace(inputs=inputs, results=results, plan=plan, best=best, targets=ts, labels=labels)


@pytest.fixture(scope="module")
def built(case_run):
    from SmartBiopsyCoreLib.runtime import new_runtime
    from SmartBiopsyLib.scene_build import build_case_scene

    rt = new_runtime()
    counts = build_case_scene(rt.scene, case_run)
    yield rt.scene, counts, rt
    rt.scene.Clear(True)


def _nodes(scene, cls):
    return [scene.GetNthNodeByClass(i, cls) for i in range(scene.GetNumberOfNodesByClass(cls))]


def _visible(node) -> bool:
    return any(node.GetNthDisplayNode(i).GetVisibility() for i in range(node.GetNumberOfDisplayNodes()))


def _point(node, i):
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(i, p)
    return np.array(p)


def test_exactly_one_visible_path_per_target_named_chosen(built, case_run):
    scene = built[0]
    lines = [n for n in _nodes(scene, "vtkMRMLMarkupsLineNode") if n.GetAttribute("TrajectoryPlanner.Target")]
    visible = [n for n in lines if _visible(n)]
    assert sorted(n.GetName() for n in visible) == [f"Chosen path {t.target}" for t in case_run.best]
    for n, t in zip(sorted(visible, key=lambda n: n.GetName()), case_run.best):
        np.testing.assert_allclose(_point(n, 1), t.target_ras, atol=1e-4)
        assert n.GetNthControlPointLabel(1) == f"target {t.target}"
    # every other candidate and every shared-entry path exists, hidden
    n_all = len(case_run.plan.trajectories) + (len(case_run.plan.shared_entry.trajectories)
                                               if case_run.plan.shared_entry is not None else 0)
    assert len(lines) == n_all and n_all > len(case_run.best)


def test_candidate_paths_are_hidden_in_their_own_folder(built, case_run):
    from SmartBiopsyLib.scene_build import CANDIDATE_FOLDER

    scene = built[0]
    sh = scene.GetSubjectHierarchyNode()
    folder = sh.GetItemByName(CANDIDATE_FOLDER)
    assert folder and sh.GetItemName(sh.GetItemParent(folder)) == "Plan"
    children = []
    ids = __import__("vtk").vtkIdList()
    sh.GetItemChildren(folder, ids)
    children = [sh.GetItemDataNode(ids.GetId(i)) for i in range(ids.GetNumberOfIds())]
    lines = [n for n in _nodes(scene, "vtkMRMLMarkupsLineNode") if n.GetAttribute("TrajectoryPlanner.Target")]
    candidates = [n for n in lines if not n.GetName().startswith("Chosen path")]
    assert {n.GetID() for n in children} == {n.GetID() for n in candidates} and candidates
    assert not any(_visible(n) for n in candidates)
    assert sh.GetItemDisplayVisibility(folder) == 0
    assert any(n.GetAttribute("TrajectoryPlanner.SharedEntry") == "1" for n in candidates) == (
        case_run.plan.shared_entry is not None)


def test_planned_notch_tip_and_target_are_separate_named_points(built, case_run):
    scene = built[0]
    fids = {n.GetName(): n for n in _nodes(scene, "vtkMRMLMarkupsFiducialNode")}
    tips = fids["Planned notch tips"]
    for k, t in enumerate(case_run.best):
        assert tips.GetNthControlPointLabel(k) == f"planned notch tip {t.target}"
        np.testing.assert_allclose(_point(tips, k), t.tip_ras, atol=1e-4)
        assert np.linalg.norm(np.asarray(t.tip_ras) - t.target_ras) > 1.0  # the tip lies beyond the target
        pts = fids[f"Target and planned notch tip {t.target}"]
        labels = [pts.GetNthControlPointLabel(i) for i in range(pts.GetNumberOfControlPoints())]
        assert labels == [f"target {t.target}", f"planned notch tip {t.target}"]
        np.testing.assert_allclose(_point(pts, 0), t.target_ras, atol=1e-4)
        np.testing.assert_allclose(_point(pts, 1), t.tip_ras, atol=1e-4)
    planned = [n for n in _nodes(scene, "vtkMRMLMarkupsLineNode") if n.GetName().startswith("Planned path")]
    assert planned and all(n.GetNthControlPointLabel(1).startswith("planned notch tip") for n in planned)
    # no point anywhere is called "target" while it sits on a planned tip
    for node in _nodes(scene, "vtkMRMLMarkupsNode"):
        for i in range(node.GetNumberOfControlPoints()):
            if "target" in node.GetNthControlPointLabel(i):
                p = [0.0] * 3
                node.GetNthControlPointPositionWorld(i, p)
                assert min(np.linalg.norm(np.asarray(t.tip_ras) - p) for t in case_run.best) > 1.0, \
                    f"{node.GetName()}: point '{node.GetNthControlPointLabel(i)}' is a planned notch tip"


def test_tumour_and_organs_at_risk_are_one_segmentation(built, case_run):
    scene = built[0]
    segs = {n.GetName(): n for n in _nodes(scene, "vtkMRMLSegmentationNode")}
    seg = segs["Tumour and organs at risk"].GetSegmentation()
    names = {seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())}
    present = {name for v, name in {3: "bone", 4: "aorta", 5: "ivc", 6: "kidney", 7: "bowel", 8: "bowel_gas"}.items()
               if np.any(case_run.labels.array == v)}
    assert names == {"Tumour"} | present and len(present) >= 3
    assert np.allclose(seg.GetSegment(seg.GetSegmentIdBySegmentName("Tumour")).GetColor(), palette.TUMOUR_COLOUR)
    # the tumour segment sits in the CT world: its bounds contain the CT-world tumour centre
    b = [0.0] * 6
    seg.GetSegment(seg.GetSegmentIdBySegmentName("Tumour")).GetBounds(b)
    from SmartBiopsyCoreLib.phantom.abdomen import TUMOUR_CENTRE_RAS
    assert all(b[2 * k] < TUMOUR_CENTRE_RAS[k] < b[2 * k + 1] for k in range(3))


def test_each_habitat_has_the_palette_colour_everywhere(built, case_run):
    scene = built[0]
    segs = {n.GetName(): n for n in _nodes(scene, "vtkMRMLSegmentationNode")}
    hab = segs["Habitats"].GetSegmentation()
    seen = {}
    for i in range(hab.GetNumberOfSegments()):
        s = hab.GetNthSegment(i)
        seen.setdefault(s.GetName(), []).append(("segment", s.GetColor()))
    fids = {n.GetName(): n for n in _nodes(scene, "vtkMRMLMarkupsFiducialNode")}
    for t in case_run.targets:
        seen.setdefault(t.region, []).append(("target", fids[f"Target {t.region}"].GetDisplayNode().GetSelectedColor()))
    for n in _nodes(scene, "vtkMRMLMarkupsLineNode"):
        if n.GetName().startswith(("Chosen path", "Planned path")):
            region = n.GetAttribute("TrajectoryPlanner.Region") or n.GetName()[-1]
            seen.setdefault(region, []).append((n.GetName(), n.GetDisplayNode().GetSelectedColor()))
    assert set(seen) == {"A", "B", "C"}
    for region, items in seen.items():
        assert {"segment", "target"} <= {k for k, _ in items} and len(items) >= 4
        for what, colour in items:
            assert np.allclose(colour, palette.REGION_COLOURS[region], atol=1e-3), (region, what, colour)


def test_the_saved_bundle_keeps_segments_visibility_and_names(built, case_run, tmp_path):
    from vtk.util import numpy_support

    from SmartBiopsyCoreLib.dataio.scene_io import load_scene_bundle, save_scene_bundle

    scene, _, rt = built
    save_scene_bundle(scene, tmp_path / "scene.mrb", rt.app_logic)
    back = load_scene_bundle(tmp_path / "scene.mrb").scene
    seg_node = next(n for n in _nodes(back, "vtkMRMLSegmentationNode") if n.GetName() == "Tumour and organs at risk")
    seg = seg_node.GetSegmentation()
    names = {seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())}
    assert {"Tumour", "kidney", "aorta"} <= names
    # the organs at risk keep their voxels (saved on the CT grid, not resampled into the tumour's MRI grid)
    kid = seg.GetSegment(seg.GetSegmentIdBySegmentName("kidney"))
    img = kid.GetRepresentation("Binary labelmap")
    arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())
    n_kid = int((arr == kid.GetLabelValue()).sum())
    assert n_kid == int((case_run.labels.array == 6).sum())
    lines = {n.GetName(): n for n in _nodes(back, "vtkMRMLMarkupsLineNode")}
    assert all(_visible(lines[f"Chosen path {t.target}"]) for t in case_run.best)
    assert not any(_visible(n) for k, n in lines.items() if k.startswith("Candidate path"))
    sh = back.GetSubjectHierarchyNode()
    assert sh.GetItemDisplayVisibility(sh.GetItemByName("Candidate paths (hidden)")) == 0

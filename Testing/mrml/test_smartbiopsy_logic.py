"""Smart Biopsy panel logic (SmartBiopsyLib.logic, what the widget calls) on a real headless scene."""
import ast
import re
from pathlib import Path

import numpy as np
import pytest

from SmartBiopsyCoreLib.dataio import dicomio, volumes_mrml
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyLib import logic, scenarios
from SmartBiopsyLib.characterise import maps as maps_lib

ROOT = Path(__file__).resolve().parents[2]


def _as_slicer_dicom_node(scene, volume, name, files):
    """A volume node as Slicer's DICOM module leaves it: voxels, geometry and DICOM.instanceUIDs, nothing of ours."""
    import pydicom

    node = volumes_mrml.add_volume_node(scene, volume, name)
    for attr in list(node.GetAttributeNames() or ()):
        if attr.startswith("SmartBiopsy."):
            node.RemoveAttribute(attr)
    uids = [str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in files]
    node.SetAttribute(logic.DICOM_UIDS_ATTRIBUTE, " ".join(uids))
    return node, dict(zip(uids, map(str, files)))


# ---------------------------------------------------------------------------------------------- (f) b-values
def test_b_values_of_the_real_prostatex_dwi_come_from_the_dicom_headers(scene, shared_data):
    import pydicom

    folder = shared_data / "prostatex-0000" / "dwi"
    by_b: dict = {}
    for f in sorted(folder.iterdir()):
        by_b.setdefault(dicomio.dicom_b_value(pydicom.dcmread(str(f), stop_before_pixels=True)), []).append(f)
    assert sorted(by_b) == [50.0, 400.0, 800.0]
    nodes, lookup = [], {}
    for b, files in by_b.items():
        vol = dicomio.load_dicom_series(str(folder), b_value=b)
        node, uids = _as_slicer_dicom_node(scene, vol, f"ep2d_diff {len(nodes)}", files)
        nodes.append(node)
        lookup.update(uids)
    bl = logic.BiopsyLogic(scene, file_for_instance=lookup.get)
    assert [logic.b_value_of_node(n, logic.B_FROM_HEADER, lookup.get) for n in nodes] == sorted(by_b)
    out = bl.compute_maps([(n, logic.B_FROM_HEADER) for n in nodes])
    got = volumes_mrml.volume_from_node(out["adc"])
    want = maps_lib.compute_adc({b: dicomio.load_dicom_series(str(folder), b_value=b) for b in by_b})
    assert np.allclose(np.asarray(got.array), np.asarray(want.array), equal_nan=True)


@pytest.fixture
def written_dwi(tmp_path):
    """Three DWI volumes written by the project's DICOM writer (b 0/400/800) and one written without a b-value."""
    case = scenarios.synthetic_tumour(spacing_mm=4.0, radius_mm=16.0)
    out = {}
    for b, vol in case["dwi"].items():
        out[b] = (vol, dicomio.write_dicom_series(vol, tmp_path / f"b{b:g}", modality="MR", b_value=b,
                                                   uid_seed=f"dwi-{b:g}"))
    plain = case["dwi"][400.0]
    out["none"] = (plain, dicomio.write_dicom_series(plain, tmp_path / "plain", modality="MR", uid_seed="plain"))
    return out


def test_dwi_loaded_by_slicer_gets_its_b_value_from_the_header_or_the_typed_field(scene, written_dwi):
    lookup, nodes = {}, {}
    for key, (vol, files) in written_dwi.items():
        nodes[key], uids = _as_slicer_dicom_node(scene, vol, f"dwi {key}", files)
        lookup.update(uids)
    bl = logic.BiopsyLogic(scene, file_for_instance=lookup.get)
    adc = bl.compute_maps([(nodes[0.0], -1.0), (nodes[400.0], -1.0), (nodes[800.0], -1.0)])["adc"]
    want = maps_lib.compute_adc({b: written_dwi[b][0] for b in (0.0, 400.0, 800.0)})
    got = volumes_mrml.volume_from_node(adc)
    assert np.nanmax(np.abs(np.asarray(got.array) - np.asarray(want.array))) < 0.01 * np.nanmax(want.array)
    # a series without b-value in its header: refused with a sentence, accepted once the b-value is typed
    with pytest.raises(InputDataError, match="type its b-value"):
        logic.b_value_of_node(nodes["none"], -1.0, lookup.get)
    assert logic.b_value_of_node(nodes["none"], 400.0, lookup.get) == 400.0
    # a typed value that contradicts the header is refused, one that agrees is accepted
    with pytest.raises(InputDataError, match="differs from its DICOM header"):
        logic.b_value_of_node(nodes[800.0], 500.0, lookup.get)
    assert logic.b_value_of_node(nodes[800.0], 800.0, lookup.get) == 800.0


def test_volume_mixing_b_values_or_missing_files_is_refused(scene, written_dwi):
    vol, files0 = written_dwi[0.0]
    _, files8 = written_dwi[800.0]
    node, lookup = _as_slicer_dicom_node(scene, vol, "mixed", list(files0) + list(files8))
    with pytest.raises(InputDataError, match="mixes b-values 0, 800"):
        logic.b_value_of_node(node, -1.0, lookup.get)
    with pytest.raises(InputDataError, match="not in the DICOM database"):
        logic.b_value_of_node(node, -1.0, {}.get)


def test_two_volumes_of_the_same_b_value_are_refused(scene, written_dwi):
    lookup, nodes = {}, []
    for key in (400.0, 400.0):
        n, uids = _as_slicer_dicom_node(scene, written_dwi[key][0], "dwi", written_dwi[key][1])
        nodes.append(n)
        lookup.update(uids)
    with pytest.raises(InputDataError, match="two DWI volumes have b = 400"):
        logic.BiopsyLogic(scene, lookup.get).compute_maps([(n, -1.0) for n in nodes])


def test_volumes_of_the_project_loader_keep_their_b_value(scene):
    case = scenarios.synthetic_tumour(spacing_mm=4.0, radius_mm=16.0)
    node = volumes_mrml.add_volume_node(scene, case["dwi"][800.0], "dwi 800")  # meta b_value -> attributes
    assert logic.b_value_of_node(node) == 800.0


# ---------------------------------------------------------------------------------------------- (d) buttons
def test_tumour_buttons_follow_the_tumour_segment_selection(scene):
    pn = scenarios.parameter_node()
    assert not logic.can_measure_tumour(pn) and not logic.can_compute_habitats(pn)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Tumour")
    sid = seg.GetSegmentation().AddEmptySegment("tumour")
    pn.tumourSegmentation = seg
    assert not logic.can_measure_tumour(pn)  # a node but no segment chosen
    pn.tumourSegmentId = "no such segment"
    assert not logic.can_measure_tumour(pn)
    pn.tumourSegmentId = sid
    assert logic.can_measure_tumour(pn) and not logic.can_compute_habitats(pn)
    pn.adcMap = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ADC")
    assert not logic.can_compute_habitats(pn)
    pn.efMap = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "EF")
    states = logic.button_states(pn)
    assert states["measureTumour"] and states["computeHabitats"]
    seg.GetSegmentation().RemoveSegment(sid)  # the segment deleted in the Segment Editor
    assert not logic.button_states(pn)["measureTumour"]


def test_widget_connects_the_tumour_segment_selector_and_decides_buttons_by_the_logic():
    tree = ast.parse((ROOT / "SmartBiopsy" / "SmartBiopsy.py").read_text())
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SmartBiopsyWidget")
    src = ast.unparse(widget)
    for signal in ("currentNodeChanged(vtkMRMLNode*)", "currentSegmentChanged(QString)"):
        assert re.search(r"tumourSegmentSelector\.connect\('" + re.escape(signal) + r"'", src), signal
    check = ast.unparse(next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "_checkCanApply"))
    assert "buttonStates" in check and "tumourSegmentSelector" not in check


# ---------------------------------------------------------------------------------------------- (e) report
def test_generate_report_writes_the_case_folder_with_every_done_step_and_its_figures(scene):
    from SmartBiopsyCoreLib.optional import available

    out = scenarios.scenario_logic_report(scene)
    assert out["figures"] >= (5 if available("matplotlib") else 0)
    assert all(out["not_available"][t] == 0 for t in list(out["not_available"])[1:6])


# ---------------------------------------------------------------------------------------------- habitat colours
def _shown_colour(node):
    d = node.GetDisplayNode()
    return None if d is None or not d.GetVisibility() else tuple(round(c, 3) for c in d.GetSelectedColor())


def test_the_panel_shows_each_target_in_its_habitats_colour_as_the_case_scene_does(scene):
    from SmartBiopsyCoreLib import palette

    case = scenarios.synthetic_tumour(spacing_mm=3.0, radius_mm=20.0)
    grid = case["grid"]
    adc = volumes_mrml.add_volume_node(scene, grid.with_array(case["adc"].astype(np.float32)), "ADC")
    ef = volumes_mrml.add_volume_node(scene, grid.with_array(case["ef"].astype(np.float32)), "EF")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MRI to CT")
    bl = logic.BiopsyLogic(scene)
    out = bl.compute_habitats(adc, ef, None, grid.with_array(case["mask"].astype(np.uint8)), transform_node=transform)
    regions = [t.region for t in out["targets"]]
    assert regions == ["A", "B", "C"]
    segmentation = out["nodes"]["segmentation"].GetSegmentation()
    segment_colour = {segmentation.GetNthSegment(i).GetName(): tuple(round(c, 3) for c in
                                                                      segmentation.GetNthSegment(i).GetColor())
                      for i in range(segmentation.GetNumberOfSegments())}
    # every point a reader sees in the views: a target of habitat X is drawn in X's colour, the segment's colour
    shown = {}
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLMarkupsFiducialNode")
        colour = _shown_colour(node)
        if colour is None:
            continue
        for k in range(node.GetNumberOfControlPoints()):
            label = node.GetNthControlPointLabel(k)
            region = label.split()[-1] if label.split() else ""
            assert region in "ABC" and len(region) == 1, f"point '{label}' of '{node.GetName()}' names no habitat"
            shown.setdefault(region, set()).add(colour)
            assert label == f"target {region}", label
    assert sorted(shown) == regions, shown
    for region, colours in shown.items():
        want = tuple(round(c, 3) for c in palette.region_colour(region))
        assert colours == {want} == {segment_colour[region]}, (region, colours, segment_colour[region])
    assert len({c for cs in shown.values() for c in cs}) == 3  # three habitats, three colours
    # the per-target nodes sit with the habitats in the MRI world; the planner's one list of targets stays
    points = out["nodes"]["target_points"]
    assert [n.GetName() for n in points] == ["Target A", "Target B", "Target C"]
    assert all(n.GetTransformNodeID() == transform.GetID() for n in points)
    planner_input = out["nodes"]["targets"]
    assert [planner_input.GetNthControlPointLabel(i) for i in range(planner_input.GetNumberOfControlPoints())] == regions
    assert planner_input.GetTransformNodeID() == transform.GetID() and _shown_colour(planner_input) is None


def test_widget_gives_the_planner_the_one_list_of_targets():
    tree = ast.parse((ROOT / "SmartBiopsy" / "SmartBiopsy.py").read_text())
    logic_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SmartBiopsyLogic")
    src = ast.unparse(logic_cls)
    assert "pn.targets = result['nodes']['targets']" in src
    params = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SmartBiopsyParameterNode")
    assert "targets: vtkMRMLMarkupsFiducialNode" in ast.unparse(params)


# ---------------------------------------------------------------------------------------------- planned notch tip
def _line(scene, entry, target, beyond=None):
    line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "Chosen path A")
    line.AddControlPoint([float(v) for v in entry], "entry")
    line.AddControlPoint([float(v) for v in target], "target A")
    line.SetAttribute("TrajectoryPlanner.Target", "A")
    line.SetAttribute("TrajectoryPlanner.Region", "A")
    if beyond is not None:
        line.SetAttribute(logic.TIP_BEYOND_TARGET_ATTRIBUTE, str(beyond))
    return line


def test_needle_check_measures_the_needle_against_the_planned_notch_tip_not_the_target(scene):
    from SmartBiopsyLib.sampling import needle_sim

    entry, target = np.array([-10.0, -40.0, -8.0]), np.array([2.0, 12.0, 3.0])
    d = (target - entry) / np.linalg.norm(target - entry)
    tip = target + 14.6 * d  # where the plan puts the tip so that the notch covers the target
    line = _line(scene, entry, target, 14.6)
    assert np.allclose(logic.planned_tip(line), tip, atol=1e-6)
    sim = needle_sim.simulate_confirmation_ct(scenarios.synthetic_ct(), entry, tip, "15G/16G-16cm",
                                              lateral_error_mm=1.0, depth_error_mm=0.0, seed=3)
    ct_node = volumes_mrml.add_volume_node(scene, sim.ct, "Confirmation CT A (simulated)")
    det = logic.BiopsyLogic(scene).detect_needle(ct_node, line, "15G/16G-16cm")
    # a needle placed exactly as planned has no depth error (it would read about +14.6 mm against the target)
    assert abs(det.depth_error_mm) < 1.5, det.depth_error_mm
    assert np.allclose(det.planned_target_ras, tip, atol=1e-6)
    # a line drawn by hand ends where the tip should go; a stored distance that is not 0..60 mm is refused
    assert np.allclose(logic.planned_tip(_line(scene, entry, target)), target)
    for bad in ("-3", "ten", "nan", "250"):
        with pytest.raises(InputDataError, match="beyond the target"):
            logic.planned_tip(_line(scene, entry, target, bad))


# ---------------------------------------------------------------------------------------------- target table
def test_target_table_shows_each_targets_hit_probability_from_the_habitat_step(scene):
    case = scenarios.synthetic_tumour(spacing_mm=3.0, radius_mm=20.0)
    grid = case["grid"]
    adc = volumes_mrml.add_volume_node(scene, grid.with_array(case["adc"].astype(np.float32)), "ADC")
    ef = volumes_mrml.add_volume_node(scene, grid.with_array(case["ef"].astype(np.float32)), "EF")
    out = logic.BiopsyLogic(scene).compute_habitats(adc, ef, None, grid.with_array(case["mask"].astype(np.uint8)))
    columns, rows = logic.target_rows(out["targets"])
    assert columns[columns.index("hit probability %") - 1] == "error 95 % mm" and len(rows) == 3
    hit = columns.index("hit probability %")
    for t, row in zip(out["targets"], rows):
        assert len(row) == len(columns) and row[0] == t.region
        assert t.hit_probability is not None and 0.0 <= t.hit_probability <= 1.0
        assert row[hit] == f"{100 * t.hit_probability:.0f} \u00b1 {100 * t.hit_probability_se:.0f}", row
    t = out["targets"][0]
    t.hit_probability = None  # e.g. hit_samples=0: said, not shown as a number
    assert logic.target_rows([t])[1][0][hit] == "not evaluated"


def test_widget_fills_the_target_table_from_the_logic():
    src = (Path(logic.__file__).resolve().parents[1] / "SmartBiopsy.py").read_text()
    body = src[src.index("def onComputeHabitats"):src.index("def onEditHabitats")]
    assert "target_rows(result[\"targets\"])" in body and "hit_probability" not in body

"""Hospital export, DICOM part: SEG (tumour, habitats, risk structures), Parametric Maps and the TID 1500 SR of a
small case read back with the project's readers (labels, frames, values, points, units) and checked by dciodvfy."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from export_fixture import build_and_export
from SmartBiopsyCoreLib.dataio.imageio import load_image


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return build_and_export(tmp_path_factory.mktemp("export"))


def _obj(res, path_end):
    return next(o for o in res.objects if o.path.endswith(path_end))


def test_segmentation_round_trip_gives_the_same_labels_frames_and_voxels(exported):
    from SmartBiopsyLib.export.seg import read_segmentation
    from SmartBiopsyLib.export.sources import volume_slices, find_original

    case, out, res, _facts, _labels = exported
    seg = read_segmentation(out / "dicom" / "seg_tumour_habitats.dcm")
    hab = load_image(case / "characterisation" / "habitats.nrrd")
    tum = load_image(case / "characterisation" / "tumour.nrrd")
    assert [s.label for s in seg.segments] == ["Tumour", "Habitat A", "Habitat B", "Habitat C"]
    src = find_original(hab, [out / "dicom" / "source"], "mri")
    assert src is not None and src.origin == "original"  # the derived source lies exactly on the map grid
    habs = volume_slices(hab, src)
    tums = volume_slices(tum, src)
    # planes of the SEG sorted along the normal = source slices sorted the same way
    normal = np.cross(*np.asarray(src.first.ImageOrientationPatient, float).reshape(2, 3))
    order = np.argsort([float(np.asarray(d.ImagePositionPatient, float) @ normal) for d in src.datasets])
    nz_planes = [k for k in order if tums[k].any() or habs[k].any()]
    expected = {"Tumour": tums != 0, "Habitat A": habs == 1, "Habitat B": habs == 2, "Habitat C": habs == 3}
    for s in seg.segments:
        want = expected[s.label]
        assert s.voxels == int(want.sum())
        assert s.frames == int(sum(1 for k in range(len(want)) if want[k].any()))
        stacked = want[[k for k in order if any(expected[x][k].any() for x in expected)]]
        assert np.array_equal(seg.masks[s.label], stacked), s.label
    assert len(nz_planes) == seg.masks["Tumour"].shape[0]
    # habitats lie inside the tumour: overlap = habitat size
    assert seg.overlap_voxels("Tumour", "Habitat A") == int((habs == 1).sum())
    assert seg.referenced_series_uid == str(src.first.SeriesInstanceUID)
    assert seg.frame_of_reference_uid == str(src.first.FrameOfReferenceUID)


def test_risk_segmentation_names_each_structure_with_its_snomed_type(exported):
    from SmartBiopsyLib.export.seg import read_segmentation

    _case, out, _res, _facts, labels = exported
    seg = read_segmentation(out / "dicom" / "seg_risk.dcm")
    by = {s.label: s for s in seg.segments}
    assert by["aorta"].type == "SCT:15825003 Aorta"
    assert by["kidney"].type == "SCT:64033007 Kidney"
    for value, name in {4: "aorta", 5: "ivc", 6: "kidney"}.items():
        assert by[name].voxels == int((labels.array == value).sum())


def test_parametric_maps_read_back_with_values_and_ucum_units(exported):
    from SmartBiopsyLib.export.parametric import read_parametric_map
    from SmartBiopsyLib.export.sources import find_original, volume_slices

    case, out, _res, _facts, _labels = exported
    units = {"adc": "um2/s", "ff": "%", "ef": "%"}
    for k, u in units.items():
        vol = load_image(case / "characterisation" / f"{k}.nrrd")
        src = find_original(vol, [out / "dicom" / "source"], "mri")
        pm = read_parametric_map(out / "dicom" / f"pm_{k}.dcm")
        assert pm["unit"] == u and pm["unit_scheme"] == "UCUM" and pm["label"] == k.upper()
        want = volume_slices(vol, src).astype(np.float32)
        got = pm["values"]
        # frames follow the plane positions; compare as sorted stacks of slices
        ds = pydicom.dcmread(str(out / "dicom" / f"pm_{k}.dcm"), stop_before_pixels=True)
        pos = [np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
               for f in ds.PerFrameFunctionalGroupsSequence]
        src_pos = [tuple(np.round(np.asarray(d.ImagePositionPatient, float), 3)) for d in src.datasets]
        for f, p in enumerate(pos):
            kk = src_pos.index(tuple(np.round(p, 3)))
            np.testing.assert_allclose(got[f], np.nan_to_num(want[kk], nan=0.0), rtol=0, atol=1e-4 * max(1, abs(want).max()))
    assert read_parametric_map(out / "dicom" / "pm_adc.dcm")["quantity"] == "Apparent Diffusion Coefficient"


def test_measurement_report_holds_targets_cores_and_trajectories_in_ct_coordinates(exported):
    from SmartBiopsyLib.export.sr import read_report

    case, out, _res, facts, _labels = exported
    rep = read_report(out / "dicom" / "sr_measurements.dcm")
    tdoc = json.loads((case / "characterisation" / "targets.json").read_text())
    for t in tdoc["targets"]:
        g = rep[t["name"]]
        assert g["region"] == t["region"]
        np.testing.assert_allclose(g["point_ras"], t["point_ct_ras"], atol=1e-3)
        assert g["measurements"]["Predicted registration error"] == (pytest.approx(t["predicted_tre_mm"]), "mm")
    for traj in facts["trajectories"]:
        g = rep[f"Trajectory {traj['region']}"]
        np.testing.assert_allclose(g["points"]["Entry point"], traj["entry_ras"], atol=1e-3)
        np.testing.assert_allclose(g["points"]["Target point"], traj["target_ras"], atol=1e-3)
        assert g["texts"]["Needle model"]
        assert g["measurements"]["Trajectory length"][1] == "mm"
    notch = json.loads((case / "sampling" / "notch_values.json").read_text())
    for traj in facts["trajectories"]:
        pot = f"POT-{traj['region']}"
        g = rep[pot]
        assert g["texts"]["Specimen Identifier"] == pot and g["region"] == traj["region"]
        needle = json.loads((case / "sampling" / traj["target"].replace(" ", "_") / "needle.json").read_text())["detection"]
        assert g["measurements"]["Needle lateral error"][0] == pytest.approx(needle["lateral_error_mm"])
        assert g["measurements"]["Needle depth error"][0] == pytest.approx(needle["depth_error_mm"])
        np.testing.assert_allclose(g["point_ras"], needle["tip_ras"], atol=1e-3)
        vals = notch[traj["target"]]["maps"]  # rounded to 4 decimals in notch.json; the journal keeps all
        assert g["measurements"]["ADC notch mean"] == (pytest.approx(vals["adc"]["mean"], rel=1e-3), "um2/s")
        assert g["measurements"]["EF notch standard deviation"] == (pytest.approx(vals["ef"]["sd"], rel=1e-3), "%")


def test_every_exported_dicom_object_passes_dciodvfy(exported):
    from SmartBiopsyLib.export.validate import dciodvfy_available, run_dciodvfy

    if not dciodvfy_available():
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools); the DICOM validity check is skipped")
    _case, out, res, _f, _l = exported
    dicoms = [o for o in res.objects if o.kind in ("seg", "pm", "sr")]
    assert {o.kind for o in dicoms} == {"seg", "pm", "sr"} and len(dicoms) == 6
    for o in dicoms:
        r = run_dciodvfy(out / o.path)
        assert r.errors == [], (o.path, r.errors)
        assert o.validation["errors"] == 0


def test_manifest_says_the_sources_are_derived_and_never_the_patients(exported):
    _case, out, res, _f, _l = exported
    m = json.loads((out / "manifest.json").read_text())
    srcs = [o["references"]["source"] for o in m["objects"] if o["kind"] in ("seg", "pm")]
    assert srcs and all(s["origin"] == "derived" and "NOT the patient's original" in s["note"] for s in srcs)
    assert any("derived source series" in n for n in m["notes"])
    ds = pydicom.dcmread(str(out / "dicom" / "seg_tumour_habitats.dcm"), stop_before_pixels=True)
    ref = ds.ReferencedSeriesSequence[0].SeriesInstanceUID
    src_files = list((out / "dicom" / "source" / "mri").iterdir())
    src = pydicom.dcmread(str(src_files[0]), stop_before_pixels=True)
    assert ref == src.SeriesInstanceUID and "derived source" in src.SeriesDescription


def test_original_series_on_the_same_grid_is_referenced_instead_of_a_derived_one(tmp_path):
    """A case whose maps came from DICOM: the SEG references that original series and writes no derived one."""
    pytest.importorskip("highdicom")
    from SmartBiopsyCoreLib.dataio.dicomio import write_dicom_series
    from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
    from SmartBiopsyLib.export.seg import SegmentSpec, read_segmentation, write_segmentation
    from SmartBiopsyLib.export.sources import source_for
    from SmartBiopsyLib.export.common import CAT_ALTERED, TYPE_NEOPLASM

    grid = make_grid([10.0, -20.0, 5.0], (1.5, 1.5, 3.0), (6, 12, 10))
    img = RasVolume(np.random.default_rng(0).normal(100, 10, (6, 12, 10)).astype(np.float32), grid, "t2")
    write_dicom_series(img, tmp_path / "orig", modality="MR", series_description="original", uid_seed="x")
    lab = np.zeros((6, 12, 10), np.uint8)
    lab[2:4, 3:7, 2:5] = 1
    vol = RasVolume(lab, grid, "tumour")
    src = source_for(vol, [tmp_path / "orig"], "mri", "MR", tmp_path / "derived", "P1")
    assert src.origin == "original" and not (tmp_path / "derived").exists()
    write_segmentation([(SegmentSpec("Tumour", (1,), CAT_ALTERED, TYPE_NEOPLASM), vol)], src, tmp_path / "s.dcm",
                       series_number=5, series_description="t")
    seg = read_segmentation(tmp_path / "s.dcm")
    orig = pydicom.dcmread(str(next((tmp_path / "orig").iterdir())), stop_before_pixels=True)
    assert seg.referenced_series_uid == orig.SeriesInstanceUID
    assert seg.segments[0].frames == 2 and seg.segments[0].voxels == int(lab.sum())


def test_the_diffusion_series_is_referenced_with_one_image_per_slice_at_the_lowest_b(tmp_path):
    """Maps computed from a multi-b DWI reference that DWI (b = lowest image of each slice), not another MR series
    that happens to share the grid."""
    from SmartBiopsyCoreLib.dataio.dicomio import write_dicom_series, write_dwi_series
    from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
    from SmartBiopsyLib.export.sources import find_original

    grid = make_grid([0.0, 0.0, 0.0], (2.0, 2.0, 4.0), (5, 8, 9))
    img = lambda v: RasVolume(np.full((5, 8, 9), v, np.float32), grid, "x")  # noqa: E731
    write_dicom_series(img(100.0), tmp_path / "a_t2", modality="MR", series_description="T2", uid_seed="t2")
    write_dwi_series({800.0: img(50.0), 0.0: img(400.0)}, tmp_path / "b_dwi", series_description="DWI", uid_seed="d")
    src = find_original(img(0.0), [tmp_path], "mri")
    assert src is not None and src.first.SeriesDescription == "DWI"
    assert len(src.datasets) == 5 and all(float(d[0x0018, 0x9087].value) == 0.0 for d in src.datasets)
    assert "lowest b-value" in src.note


def test_a_series_shifted_off_the_grid_is_not_referenced_and_a_derived_source_is_written(tmp_path):
    """Half a voxel in-plane or a fraction of a slice off: the SEG would misplace every voxel, so it is not used."""
    from SmartBiopsyCoreLib.dataio.dicomio import write_dicom_series
    from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
    from SmartBiopsyLib.export.sources import source_for

    grid = make_grid([0.0, 0.0, 0.0], (2.0, 2.0, 4.0), (5, 8, 9))
    vol = RasVolume(np.ones((5, 8, 9), np.float32), grid, "x")
    for n, shift in enumerate(([1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.3, 0.0])):
        g = grid.copy()
        g[:3, 3] += shift
        write_dicom_series(RasVolume(np.ones((5, 8, 9), np.float32), g, "s"), tmp_path / f"s{n}", modality="MR",
                           uid_seed=f"s{n}")
        src = source_for(vol, [tmp_path / f"s{n}"], "mri", "MR", tmp_path / f"d{n}", "P")
        assert src.origin == "derived", shift


def test_without_the_export_libraries_the_export_stops_with_one_sentence_and_writes_nothing(tmp_path, monkeypatch):
    import builtins

    from SmartBiopsyLib.export.case import export_case
    from SmartBiopsyLib.export.common import ExportUnavailable

    real_import = builtins.__import__

    def no_highdicom(name, *a, **k):
        if name == "highdicom" or name.startswith("highdicom."):
            raise ImportError("No module named 'highdicom'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_highdicom)
    (tmp_path / "case" / "characterisation").mkdir(parents=True)
    with pytest.raises(ExportUnavailable, match=r"needs the highdicom package .*pip install") as exc:
        export_case(tmp_path / "case", tmp_path / "out")
    assert len(str(exc.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- segment colours
def test_srgb_to_dicom_cielab_gives_the_published_values():
    from SmartBiopsyLib.export import seg

    # sRGB red in CIE L*a*b* (D65), as published (Lindbloom's calculator: 53.2408, 80.0925, 67.2032)
    assert np.allclose(seg.srgb_to_cielab((1.0, 0.0, 0.0)), (53.2408, 80.0925, 67.2032), atol=0.01)
    # white and black: a* = b* = 0 is 0x8080 in the scaled DICOM form (PS3.3 C.10.7.1.1)
    assert seg.dicom_cielab_of_rgb((1.0, 1.0, 1.0)) == (0xFFFF, 0x8080, 0x8080)
    assert seg.dicom_cielab_of_rgb((0.0, 0.0, 0.0)) == (0, 0x8080, 0x8080)
    assert seg.cielab_to_dicom((100.0, -128.0, 127.0)) == (0xFFFF, 0, 0xFFFF)
    # CSS orange (255, 165, 0): highdicom's documented stored value (49107, 39048, 53188); the sRGB matrices of
    # the two implementations differ in the 5th digit, a few units of 65535
    assert np.allclose(seg.dicom_cielab_of_rgb((1.0, 165 / 255, 0.0)), (49107, 39048, 53188), atol=4)


def test_palette_colours_survive_the_dicom_cielab_round_trip():
    from SmartBiopsyCoreLib import palette
    from SmartBiopsyLib.export import seg

    colours = list(palette.REGION_COLOURS.values()) + list(palette.RISK_COLOURS.values()) + [
        palette.TUMOUR_COLOUR, palette.NEUTRAL_COLOUR, palette.NEEDLE_COLOUR, palette.NOTCH_TIP_COLOUR]
    for rgb in colours:
        lab = seg.srgb_to_cielab(rgb)
        assert np.allclose(seg.cielab_to_srgb(lab), rgb, atol=1e-6), rgb
        assert np.allclose(seg.dicom_to_cielab(seg.cielab_to_dicom(lab)), lab, atol=0.002), rgb  # 16-bit steps
        assert np.allclose(seg.rgb_of_dicom_cielab(seg.dicom_cielab_of_rgb(rgb)), rgb, atol=1e-3), rgb
    try:  # the same stored values as highdicom's own conversion (when this highdicom has one)
        from highdicom.color import CIELabColor
    except ImportError:
        return
    for rgb in colours:
        want = CIELabColor.from_rgb(*[255.0 * c for c in rgb]).value
        assert np.allclose(seg.dicom_cielab_of_rgb(rgb), want, atol=8), rgb


def test_exported_segments_show_the_colours_of_the_scene_and_the_report(exported):
    from SmartBiopsyCoreLib import palette
    from SmartBiopsyLib.characterise.mrml import SEGMENT_STYLE
    from SmartBiopsyLib.export.seg import dicom_cielab_of_rgb, read_segmentation

    _case, out, _res, _facts, _labels = exported
    seg = read_segmentation(out / "dicom" / "seg_tumour_habitats.dcm")
    by = {s.label: s for s in seg.segments}
    for region, (_code, scene_rgb) in SEGMENT_STYLE.items():
        got = by[f"Habitat {region}"].display_rgb
        assert got is not None, f"habitat {region} has no Recommended Display CIELab Value"
        # the scene's segmentation colour, the report's colour (palette) and the PACS colour are one colour
        assert np.allclose(got, scene_rgb, atol=2e-3), (region, got, scene_rgb)
        assert np.allclose(got, palette.region_colour(region), atol=2e-3), region
    assert np.allclose(by["Tumour"].display_rgb, palette.TUMOUR_COLOUR, atol=2e-3)
    ds = pydicom.dcmread(str(out / "dicom" / "seg_tumour_habitats.dcm"), stop_before_pixels=True)
    stored = {str(i.SegmentLabel): tuple(int(v) for v in i.RecommendedDisplayCIELabValue) for i in ds.SegmentSequence}
    assert stored["Habitat B"] == dicom_cielab_of_rgb(palette.REGION_COLOURS["B"])
    assert len({stored[f"Habitat {r}"] for r in "ABC"} | {stored["Tumour"]}) == 4
    risk = {s.label: s for s in read_segmentation(out / "dicom" / "seg_risk.dcm").segments}
    assert np.allclose(risk["kidney"].display_rgb, palette.RISK_COLOURS["kidney"], atol=2e-3)
    assert all(s.display_rgb is not None for s in risk.values())


def test_person_names_are_written_as_dicom_person_names_without_library_warnings(tmp_path):
    """The derived sources' patient name and the report's observer (the operator) are single-component person
    names marked with a trailing caret; highdicom warns about an ambiguous name otherwise."""
    import warnings

    from SmartBiopsyCoreLib.dataio.dicomio import person_name

    assert person_name("PHANTOM0000") == "PHANTOM0000^"
    assert person_name("Doe^Jane") == "Doe^Jane"
    assert person_name("") == ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _case, out, _res, _facts, _labels = build_and_export(tmp_path)
    about_names = [str(w.message)[:90] for w in caught if "person name" in str(w.message)]
    assert not about_names, about_names
    sr = pydicom.dcmread(out / "dicom" / "sr_measurements.dcm")
    names = []
    sr.walk(lambda _ds, elem: names.append(str(elem.value)) if elem.keyword == "PersonName" else None)
    assert names and all("^" in n for n in names), names
    derived = [pydicom.dcmread(p, stop_before_pixels=True) for p in (out / "dicom" / "source").rglob("*.dcm")]
    assert derived and all(str(ds.PatientName).endswith("^") for ds in derived)  # derived source series

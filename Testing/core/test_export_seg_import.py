"""DICOM SEG files from two independent writers (dcmqi, highdicom; ../shared/data/dicom-seg) import with the right
segment labels, coded types, frames and overlaps."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from SmartBiopsyCoreLib.errors import InputDataError


def _read(shared_data, rel):
    from SmartBiopsyLib.export.seg import read_segmentation

    p = shared_data / "dicom-seg" / rel
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return read_segmentation(p)


def _overlaps(seg):
    labs = [s.label for s in seg.segments]
    return {(a, b): seg.overlap_voxels(a, b) for a, b in itertools.combinations(labs, 2) if seg.overlap_voxels(a, b)}


def test_dcmqi_liver_segmentation_imports_one_liver_segment_on_three_frames(shared_data):
    seg = _read(shared_data, "dcmqi/liver.dcm")
    assert [(s.label, s.type, s.frames) for s in seg.segments] == [("Liver", "SRT:T-62000 Liver", 3)]
    assert seg.masks["Liver"].shape == (3, 512, 512) and seg.segments[0].voxels == 107098


def test_dcmqi_partial_overlaps_keep_each_segment_and_its_overlaps(shared_data):
    seg = _read(shared_data, "dcmqi/partial_overlaps.dcm")
    assert [s.label for s in seg.segments] == ["GREEN", "ORANGE", "PURPLE", "LIGHT_BLUE", "DARK_BLUE"]
    assert [s.frames for s in seg.segments] == [1, 1, 3, 1, 1]
    assert [s.type.split(" ", 1)[1] for s in seg.segments] == ["Tissue", "Artery", "Capillary", "Edema", "Vein"]
    assert _overlaps(seg) == {("GREEN", "ORANGE"): 3017, ("GREEN", "PURPLE"): 95, ("ORANGE", "PURPLE"): 50}
    # single-frame segments sit on the plane of their own frame, not all on the first plane
    planes = {s.label: tuple(np.nonzero(seg.masks[s.label].any(axis=(1, 2)))[0]) for s in seg.segments}
    assert planes["PURPLE"] == (0, 1, 2)
    assert len({planes[k] for k in ("GREEN", "LIGHT_BLUE", "DARK_BLUE")}) >= 1


def test_highdicom_binary_segmentations_import_with_their_overlap(shared_data):
    seg = _read(shared_data, "highdicom/seg_image_ct_binary.dcm")
    assert [(s.label, s.type, s.frames, s.voxels) for s in seg.segments] == [
        ("first segment", "SCT:272673000 Bone", 3, 638)]
    seg = _read(shared_data, "highdicom/seg_image_ct_binary_overlap.dcm")
    assert [(s.label, s.frames, s.voxels) for s in seg.segments] == [("first segment", 4, 64), ("second segment", 4, 16)]
    assert _overlaps(seg) == {("first segment", "second segment"): 16}


def test_a_file_that_is_not_a_segmentation_is_refused_with_a_sentence(tmp_path, shared_data):
    from SmartBiopsyLib.export.seg import read_segmentation

    p = tmp_path / "x.dcm"
    p.write_bytes(b"not dicom at all")
    with pytest.raises(InputDataError, match="not a readable DICOM file"):
        read_segmentation(p)
    src = next((shared_data / "prostatex-0000" / "t2_tra").rglob("*"))
    while src.is_dir():
        src = next(src.iterdir())
    with pytest.raises(InputDataError, match="not a DICOM Segmentation"):
        read_segmentation(src)

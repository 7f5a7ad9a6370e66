"""``smartbiopsy register`` on the phantom written to disk, as a user runs it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from RegistrationFusionLib.registration.landmarks import apply_transform
from RegistrationFusionLib.registration.refine import read_itk_transform
from SmartBiopsyLib.cli.main import main


@pytest.fixture(scope="module")
def phantom_files(phantom0, tmp_path_factory):
    d = tmp_path_factory.mktemp("phantom0")
    phantom0.write(d, dicom=False)
    return phantom0, d


def test_register_command_writes_transform_resampled_mri_and_qa(phantom_files, tmp_path, capsys):
    case, d = phantom_files
    tumour = case.ct.voxel_centres_ras(case.ct_labels.array == 9)
    c = tumour.mean(axis=0)
    out = tmp_path / "reg"
    rc = main(["register", "--ct", str(d / "ct.nrrd"), "--mri", str(d / "mri_t2.nrrd"), "--out", str(out),
               "--target", *map(str, c), "--no-refine"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["passed"] is True and summary["capsules_paired"] == len(case.truth.capsules_ct)
    for name in ("mri_to_ct.tfm", "mri_to_ct.h5", "transform.json", "mri_on_ct.nrrd", "qa.json",
                 "registration.json", "fusion_checkerboard.png", "fusion_overlay.png"):
        assert (out / name).stat().st_size > 0, name
    m = np.array(json.loads((out / "transform.json").read_text())["matrix_mri_to_ct_ras"])
    for f in ("mri_to_ct.tfm", "mri_to_ct.h5"):
        assert np.allclose(read_itk_transform(str(out / f)), m, atol=1e-6)
    pts = tumour[::200]
    err = np.linalg.norm(apply_transform(m @ np.linalg.inv(case.truth.mri_to_ct), pts) - pts, axis=1)
    assert err.mean() < 1.0
    qa = json.loads((out / "qa.json").read_text())
    assert qa["passed"] and qa["targets"][0]["predicted_tre_mm"] < 3.0
    assert qa["pictures"]["overlay"] == "fusion_overlay.png"


def test_register_command_refuses_swapped_inputs(phantom_files, tmp_path, capsys):
    _, d = phantom_files
    rc = main(["register", "--ct", str(d / "mri_t2.nrrd"), "--mri", str(d / "ct.nrrd"), "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Hounsfield" in err


def test_register_command_reports_missing_file(tmp_path, capsys):
    rc = main(["register", "--ct", str(tmp_path / "nope.nrrd"), "--mri", str(tmp_path / "nope2.nrrd"),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_register_with_failed_qa_exits_3_unless_accepted(phantom_files, tmp_path, capsys):
    """A registration whose QA fails (FRE limit below the phantom's 0.1 mm) is a warning that matters: exit 3,
    printed on the console; --accept-warnings gives 0 and still prints it."""
    _, d = phantom_files
    args = ["register", "--ct", str(d / "ct.nrrd"), "--mri", str(d / "mri_t2.nrrd"), "--no-refine",
            "--max-fre-mm", "0.01"]
    rc = main([*args, "--out", str(tmp_path / "reg")])
    cap = capsys.readouterr()
    assert rc == 3, cap.err
    assert json.loads(cap.out.strip().splitlines()[-1])["passed"] is False
    assert any(line.startswith("warning: registration QA failed") for line in cap.err.splitlines()), cap.err
    assert main([*args, "--accept-warnings", "--out", str(tmp_path / "reg2")]) == 0
    assert "warning: registration QA failed" in capsys.readouterr().err

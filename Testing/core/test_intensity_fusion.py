"""Capsule-free (intensity-only) fusion: DICOM Patient Position prior, principal-axes multi-start,
refusal of ambiguous pairs, the automatic fallback and its QA (an error estimate, never a capsule TRE)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from RegistrationFusionLib.registration import intensity, qa
from RegistrationFusionLib.registration.pipeline import IntensityFusion, fuse_with_fallback
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid


def tumour_tre(case, m):
    mask = case.truth.tumour_mask_mri
    pts = mask.voxel_centres_ras(mask.array > 0)[::50]
    t = case.truth.mri_to_ct
    return np.linalg.norm((pts @ m[:3, :3].T + m[:3, 3]) - (pts @ t[:3, :3].T + t[:3, 3]), axis=1)


def symmetric_pair():
    """A featureless ball (CT: water in air; MRI: bright in dark), a rotation about its centre is invisible."""
    def ball(value, background, spacing, noise, seed):
        n = 48
        m = make_grid((-(n - 1) / 2 * spacing,) * 3, (spacing,) * 3, (n, n, n))
        k, j, i = np.mgrid[0:n, 0:n, 0:n]
        r = np.sqrt(((i - (n - 1) / 2) ** 2 + (j - (n - 1) / 2) ** 2 + (k - (n - 1) / 2) ** 2)) * spacing
        a = np.where(r <= 45.0, value, background) + np.random.default_rng(seed).normal(0, noise, r.shape)
        return RasVolume(a.astype(np.float32), m, "ball")
    return ball(0.0, -1000.0, 3.0, 5.0, 1), ball(400.0, 10.0, 2.5, 5.0, 2)


def test_position_prior_turns_feet_first_ct_to_head_first_mri():
    pts = np.random.default_rng(0).normal(size=(100, 3)) * [30, 20, 80]
    prior, hyps = intensity.pose_hypotheses({"patient_position": "FFS"}, {"patient_position": "HFS"}, pts, pts)
    assert "FFS" in prior and np.allclose(hyps[0][1], np.diag([-1.0, 1.0, -1.0]))
    assert any(np.allclose(r, np.eye(3)) for _, r in hyps)  # a correct DICOM patient frame is tried too
    _, same = intensity.pose_hypotheses({"patient_position": "HFS"}, {"patient_position": "HFS"}, pts, pts)
    assert len(same) == 1 and np.allclose(same[0][1], np.eye(3))
    prior, pa = intensity.pose_hypotheses({}, {}, pts, pts)
    assert "principal axes" in prior and len(pa) >= 4


def test_feet_first_ct_registers_to_head_first_mri_without_capsules(tmp_path):
    """The phantom CT written feet first (DICOM FFS) and the MRI head first (HFS), read back from DICOM:
    the capsule-free fusion is accepted with TRE <= 2 mm, and its QA is intensity-only."""
    from SmartBiopsyCoreLib.dataio.dicomio import load_dicom_series, write_dicom_series
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

    case = generate_phantom(0, ct_pose="FFS")
    write_dicom_series(case.ct, tmp_path / "ct", modality="CT", series_description="CT FFS", series_number=2,
                       patient_id="P0")
    write_dicom_series(case.mri["t2"], tmp_path / "t2", modality="MR", series_description="T2", series_number=3,
                       patient_id="P0")
    ct, t2 = load_dicom_series(tmp_path / "ct"), load_dicom_series(tmp_path / "t2")
    assert (ct.meta["patient_position"], t2.meta["patient_position"]) == ("FFS", "HFS")
    targets = {"tumour": case.truth.mri_to_ct[:3, :3] @ case.truth.tumour_mask_mri.voxel_centres_ras(
        case.truth.tumour_mask_mri.array > 0).mean(axis=0) + case.truth.mri_to_ct[:3, 3]}
    res = fuse_with_fallback(ct, t2, use_capsules=False, targets_ct=targets)
    assert isinstance(res, IntensityFusion) and res.intensity.accepted
    tre = tumour_tre(case, res.matrix)
    print(f"FFS/HFS phantom: TRE mean {tre.mean():.2f} max {tre.max():.2f} mm, estimate "
          f"{res.intensity.error_estimate_mm:.2f} mm, {res.intensity.seconds:.0f} s")
    assert tre.max() <= 2.0
    assert res.intensity.error_estimate_mm >= tre.mean()  # the estimate does not promise more than is measured
    d = res.report.to_dict()
    assert d["method"] == "intensity-only" and d["fre_mm"] is None and d["markers"] == []
    assert d["passed"] and "no capsule FRE/TRE" in d["notes"][0]
    assert d["targets"][0]["predicted_tre_mm"] == pytest.approx(res.intensity.error_estimate_mm)
    json.dumps(d, allow_nan=False)


def test_symmetric_featureless_pair_is_refused():
    ct, mr = symmetric_pair()
    res = intensity.register_intensity(ct, mr)
    print(res.reason)
    assert not res.accepted
    assert "refused" in res.reason
    with pytest.raises(intensity.IntensityFusionRefused, match="ambiguous"):
        fuse_with_fallback(ct, mr, use_capsules=False)
    rep = qa.build_intensity_report(res)
    assert not rep.passed and rep.failures == [res.reason]


def test_real_ct_mr_pair_without_capsules_falls_back_to_intensity_fusion(shared_data):
    """RIRE patient 002 head CT/T2 (no capsules, NRRD: no Patient Position): the default path finds no
    capsules and falls back to the principal-axes multi-start, which must agree with itself."""
    from SmartBiopsyCoreLib.dataio.imageio import load_image

    ct = load_image(shared_data / "rire-pat002/pat002_ct.nrrd")
    mr = load_image(shared_data / "rire-pat002/pat002_mr_T2.nrrd")
    res = fuse_with_fallback(ct, mr)
    assert isinstance(res, IntensityFusion), "capsules were reported on a capsule-free pair"
    r = res.intensity
    print(r.reason, f"{r.seconds:.0f} s")
    assert r.accepted and r.n_agreeing >= 2 and r.spread_mm <= 3.0
    assert "no skin capsules found" in res.fallback_reason


def _fake_intensity_result(accepted=True):
    return intensity.IntensityFusionResult(np.eye(4), accepted, "capsule-free fusion accepted (test)" if accepted
                                           else "the capsule-free fusion is ambiguous and was refused (test)",
                                           "test prior", [], 3, 0.4, 1.5, 1.9, 0.2, 0.3)


@pytest.mark.parametrize("n_ct, n_mr", [(2, 5), (5, 0), (4, 4)])  # (4, 4): unrelated layouts, no pair
def test_fewer_than_three_capsules_fall_back_to_capsule_free_fusion(monkeypatch, n_ct, n_mr):
    from RegistrationFusionLib.capsules import detection

    class Det(list):
        """Stands for a CapsuleDetection: a length and the centres (RAS mm)."""

    def detect(vol, modality, **kw):
        n = n_ct if modality == "ct" else n_mr
        if n == 0:
            raise detection.NoCapsulesFound("no skin capsules found in the MRI 'x'; check the field of view")
        out = Det(range(n))
        out.centres_ras, out.fle_cov_ras = np.random.default_rng(n + (modality == "ct") * 100).normal(size=(n, 3)) * 50, None
        return out

    calls = []
    monkeypatch.setattr(detection, "detect_capsules", detect)
    monkeypatch.setattr(intensity, "register_intensity", lambda *a, **k: calls.append(1) or _fake_intensity_result())
    ct, mr = symmetric_pair()
    res = fuse_with_fallback(ct, mr)
    assert calls and isinstance(res, IntensityFusion)
    assert res.report.to_dict()["method"] == "intensity-only"
    monkeypatch.setattr(intensity, "register_intensity", lambda *a, **k: _fake_intensity_result(False))
    with pytest.raises(intensity.IntensityFusionRefused, match="refused"):
        fuse_with_fallback(ct, mr)


def _starts(rows):
    """IntensityStart list from (mi_initial, mi_final, distance_to_best_mm) rows, best first."""
    return [intensity.IntensityStart("h", np.eye(4), np.eye(4), a, b, 0, d) for a, b, d in rows]


ASSESS = dict(agreement_mm=3.0, min_agreeing=2, min_mi_gain=0.01, min_margin=0.05)


def test_accepts_best_alignment_reached_by_several_starts_with_clear_margin():
    ok, reasons, n, spread, gain, margin = intensity.assess_starts(
        _starts([(0.3, 0.80, 0.0), (0.2, 0.79, 0.8), (0.25, 0.79, 1.2), (0.2, 0.50, 120.0)]), **ASSESS)
    assert ok and not reasons and n == 3 and spread == pytest.approx(1.2) and margin == pytest.approx(0.375)


def test_refuses_alignment_reached_by_a_single_start():
    ok, reasons, *_ = intensity.assess_starts(_starts([(0.3, 0.80, 0.0), (0.2, 0.60, 8.0), (0.2, 0.50, 120.0)]),
                                              **ASSESS)
    assert not ok and len(reasons) == 1 and "only 1 of 3" in reasons[0]


def test_refuses_when_a_distinct_alignment_fits_almost_as_well():
    ok, reasons, *_ = intensity.assess_starts(_starts([(0.3, 0.80, 0.0), (0.2, 0.80, 1.0), (0.2, 0.78, 60.0)]),
                                              **ASSESS)
    assert not ok and len(reasons) == 1 and "different alignment 60 mm away" in reasons[0]


def test_refuses_without_mutual_information_gain():
    ok, reasons, *_ = intensity.assess_starts(_starts([(0.795, 0.80, 0.0), (0.7, 0.80, 0.5)]), **ASSESS)
    assert not ok and len(reasons) == 1 and "hardly improved" in reasons[0]

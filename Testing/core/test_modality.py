"""The one CT-in-HU / MRI check (SmartBiopsyCoreLib.modality) on real scans: a real CT passes as CT and is
refused as MRI; real MRIs (head T2, prostate T2 and the scanner's ADC map) are refused as CT."""
from __future__ import annotations

import numpy as np
import pytest

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.modality import ct_evidence, require_ct, require_mri

MRIS = ("rire-pat002/pat002_mr_T2.nrrd", "prostatex-0000/t2_tra", "prostatex-0000/adc_scanner")


def _load(shared_data, rel):
    from SmartBiopsyCoreLib.dataio.imageio import load_image

    return load_image(shared_data / rel)


def test_real_ct_passes_as_ct_in_hounsfield_units(shared_data):
    ct = _load(shared_data, "rire-pat002/pat002_ct.nrrd")
    ev = require_ct(ct, "the RIRE CT")
    assert ev.is_ct and ev.air_fraction > 0.1 and ev.body_fraction > 0.1


@pytest.mark.parametrize("rel", MRIS)
def test_real_mri_is_refused_as_ct_with_one_sentence(shared_data, rel):
    mri = _load(shared_data, rel)
    require_mri(mri, "the MRI")
    with pytest.raises(InputDataError, match=r"does not look like a CT in Hounsfield units \(.+\); pass the planning CT"):
        require_ct(mri, "--ct x")


@pytest.mark.parametrize("rel", MRIS)
def test_real_mri_without_dicom_modality_is_refused_as_ct_by_its_values(shared_data, rel):
    mri = _load(shared_data, rel)
    mri.meta.pop("modality", None)
    ev = ct_evidence(mri)
    assert not ev.is_ct and "no air near -1000 HU" in ev.why_not_ct()
    with pytest.raises(InputDataError, match="no air near -1000 HU"):
        require_ct(mri, "--ct x")


def test_real_ct_is_refused_as_mri(shared_data):
    ct = _load(shared_data, "rire-pat002/pat002_ct.nrrd")
    with pytest.raises(InputDataError, match=r"looks like a CT in Hounsfield units, not an MRI .*; pass the MRI"):
        require_mri(ct, "--mri ct.nrrd")


def test_ct_stored_without_its_rescale_intercept_is_refused(shared_data):
    ct = _load(shared_data, "rire-pat002/pat002_ct.nrrd")
    raw = ct.with_array(ct.array.astype(np.int32) + 1024)  # stored values, rescale intercept -1024 not applied
    with pytest.raises(InputDataError, match="no air near -1000 HU"):
        require_ct(raw)


def test_dicom_modality_mr_decides_even_with_ct_like_values(shared_data):
    ct = _load(shared_data, "rire-pat002/pat002_ct.nrrd")
    ct.meta["modality"] = "MR"
    with pytest.raises(InputDataError, match="DICOM modality is MR"):
        require_ct(ct)


def test_ct_with_field_of_view_padding_still_passes(shared_data):
    ct = _load(shared_data, "rire-pat002/pat002_ct.nrrd")
    a = ct.array.astype(np.int16).copy()
    a[:, :20, :] = -3024  # outside the scanned circle
    assert require_ct(ct.with_array(a)).padding_fraction > 0.1


def test_phantom_ct_and_mris_are_recognised_even_without_dicom_modality(phantom0):
    require_ct(phantom0.ct)
    plain_ct = phantom0.ct.with_array(phantom0.ct.array)
    plain_ct.meta.pop("modality", None)
    require_ct(plain_ct)
    with pytest.raises(InputDataError):
        require_mri(plain_ct)
    vols = [v for v in phantom0.mri.values() if hasattr(v, "array")]
    assert vols
    for vol in vols:
        plain = vol.with_array(vol.array)
        plain.meta.pop("modality", None)
        require_mri(plain)
        with pytest.raises(InputDataError):
            require_ct(plain)

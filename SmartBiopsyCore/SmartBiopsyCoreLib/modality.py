"""Is this volume a CT in Hounsfield units or an MRI? One check for every command and the workflow.

A CT in HU has air near -1000 HU around the patient, a body above :data:`~SmartBiopsyCoreLib.body.BODY_HU_THRESHOLD`
and values within about -1024..3071 HU after the DICOM rescale; an MRI has none of the three together
(its values are arbitrary non-negative scanner units). The DICOM modality, when the volume carries one,
decides first. :func:`require_ct` refuses a volume that is not such a CT and :func:`require_mri` refuses a
CT given where an MRI is expected, each with one sentence (:class:`InputDataError`).

The statistics run on at most about two million voxels (a regular sub-grid), so the check costs well under
a second on a 512 x 512 x 300 CT. Values: HU for CTs; world frame irrelevant (voxel values only).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from SmartBiopsyCoreLib.body import BODY_HU_THRESHOLD
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.geometry import RasVolume

logger = logging.getLogger(__name__)

#: air in a CT: -1000 HU with noise and beam hardening; lung (about -850) partly counts
AIR_HU = (-1100.0, -850.0)
#: at least this fraction of voxels is air around the patient (the skin capsules need the skin in the CT)
MIN_AIR_FRACTION = 0.002
#: at least this fraction of voxels is body (above the body threshold)
MIN_BODY_FRACTION = 0.01
#: the 99th percentile of a CT in HU stays below this (3071 is the 12-bit maximum; metal may exceed it locally)
MAX_HU_P99 = 3100.0
#: values below this are padding outside the scanned field of view (-2048, -3024) and are not counted
PADDING_BELOW_HU = -1100.0
#: voxels the statistics look at, at most (regular sub-grid)
SAMPLE_VOXELS = 2_000_000


@dataclass
class CtEvidence:
    """What the voxel values (and DICOM modality) say about a volume being a CT in HU.

    Fractions are of the voxels inside the scanned field of view (padding below -1100 excluded).
    """

    dicom_modality: str
    air_fraction: float
    body_fraction: float
    p1: float
    p99: float
    padding_fraction: float

    @property
    def values_look_like_ct(self) -> bool:
        return (self.air_fraction >= MIN_AIR_FRACTION and self.body_fraction >= MIN_BODY_FRACTION
                and self.p99 <= MAX_HU_P99)

    @property
    def is_ct(self) -> bool:
        if self.dicom_modality and self.dicom_modality != "CT":
            return False
        return self.values_look_like_ct

    def why_not_ct(self) -> str:
        """The reason, in a few words, that the volume is not a CT in HU ('' when it is one)."""
        if self.dicom_modality and self.dicom_modality != "CT":
            return f"its DICOM modality is {self.dicom_modality}"
        reasons = []
        if self.air_fraction < MIN_AIR_FRACTION:
            reasons.append(f"no air near -1000 HU, values {self.p1:.0f} to {self.p99:.0f} (1st to 99th percentile)")
        if self.body_fraction < MIN_BODY_FRACTION:
            reasons.append(f"nothing above the body threshold of {BODY_HU_THRESHOLD:.0f} HU")
        if self.p99 > MAX_HU_P99:
            reasons.append(f"99th percentile {self.p99:.0f} above the CT maximum of about 3071 HU")
        return "; ".join(reasons)

    def why_ct(self) -> str:
        """The reason, in a few words, that the volume looks like a CT ('' when it does not)."""
        if self.dicom_modality == "CT":
            return "its DICOM modality is CT"
        if not self.dicom_modality and self.values_look_like_ct:
            return (f"{100 * self.air_fraction:.0f} % of its voxels are air near -1000 HU and the values reach "
                    f"{self.p99:.0f}")
        return ""

    def to_dict(self) -> dict:
        return {"dicom_modality": self.dicom_modality, "air_fraction": round(self.air_fraction, 4),
                "body_fraction": round(self.body_fraction, 4), "p1": round(self.p1, 1), "p99": round(self.p99, 1),
                "padding_fraction": round(self.padding_fraction, 4), "is_ct": self.is_ct}


def _sample(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    step = max(1, int(np.ceil((a.size / SAMPLE_VOXELS) ** (1.0 / 3.0)))) if a.size > SAMPLE_VOXELS else 1
    s = a[::step, ::step, ::step] if a.ndim == 3 else a.ravel()[::step ** 3]
    s = s.astype(np.float32, copy=False).ravel()
    return s[np.isfinite(s)]


def ct_evidence(volume: RasVolume) -> CtEvidence:
    """Statistics of ``volume``'s values that tell a CT in HU from an MRI (see the module docstring)."""
    modality = str((volume.meta or {}).get("modality") or "").strip().upper()
    s = _sample(volume.array)
    if s.size == 0:
        raise InputDataError(f"the image {volume.name} is empty or holds no finite values; check the file")
    inside = s[s >= PADDING_BELOW_HU]
    padding = 1.0 - inside.size / s.size
    if inside.size == 0:
        inside = s
    air = float(np.count_nonzero((inside >= AIR_HU[0]) & (inside <= AIR_HU[1]))) / inside.size
    body = float(np.count_nonzero(inside > BODY_HU_THRESHOLD)) / inside.size
    p1, p99 = (float(v) for v in np.percentile(inside, [1, 99]))
    return CtEvidence(modality, air, body, p1, p99, padding)


def require_ct(volume: RasVolume, what: str = "the CT", hint: str = "pass the planning CT") -> CtEvidence:
    """Raise :class:`InputDataError` unless ``volume`` is a CT in Hounsfield units; returns the evidence.

    ``what`` names the input in the sentence (e.g. "--ct pat.nrrd"), ``hint`` says what to do instead.
    """
    ev = ct_evidence(volume)
    logger.debug("%s: CT check %s", what, ev.to_dict())
    if not ev.is_ct:
        raise InputDataError(f"{what} does not look like a CT in Hounsfield units ({ev.why_not_ct()}); {hint}")
    return ev


def require_mri(volume: RasVolume, what: str = "the MRI", hint: str = "pass the MRI") -> CtEvidence:
    """Raise :class:`InputDataError` when ``volume`` is (or looks like) a CT in HU where an MRI is expected."""
    ev = ct_evidence(volume)
    logger.debug("%s: MRI check %s", what, ev.to_dict())
    why = ev.why_ct()
    if why:
        raise InputDataError(f"{what} looks like a CT in Hounsfield units, not an MRI ({why}); {hint}")
    return ev

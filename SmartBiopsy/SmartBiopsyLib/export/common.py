"""Shared pieces of the export: the optional libraries (imported on use, fail soft), the coded concepts and
units, the manifest entry of one exported object, and the identity of the writing device."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import logging

from SmartBiopsyCoreLib.errors import SmartBiopsyError

logger = logging.getLogger(__name__)

#: Private coding scheme for concepts no standard terminology names (documented in Docs/Export.md).
SCHEME = "99SMARTBX"
MANUFACTURER = "SmartBiopsy"
MODEL = "SmartBiopsy 3D Slicer extension"
DEVICE_SERIAL = "none"


class ExportUnavailable(SmartBiopsyError):
    """An optional export library is missing; the message says how to install it."""


def software_version() -> str:
    """SmartBiopsy's version (the one constant ``SmartBiopsyCoreLib.__version__``, also inside Slicer)."""
    from SmartBiopsyCoreLib import __version__

    return __version__


def need_highdicom():
    """Import highdicom (and check it matches pydicom) or raise ExportUnavailable with one sentence.

    Slicer 5.10 (pydicom 2.4.4, numpy 2.0.2) can only use highdicom 0.22, which still names ``numpy.float_`` (removed
    in numpy 2.0): for that version only, the alias ``numpy.float_ = numpy.float64`` is restored before the import
    (tested: SEG, Parametric Map and SR written with 0 dciodvfy errors and read back)."""
    _numpy2_alias_for_old_highdicom()
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a version clash on import
        raise ExportUnavailable(
            f"DICOM export needs the highdicom package ({exc.__class__.__name__}: {exc}); install it with "
            f"'pip install \"smartbiopsy[export]\"' or accept the installation offered by the SmartBiopsy panel"
        ) from None
    return highdicom


def _numpy2_alias_for_old_highdicom() -> None:
    try:
        from importlib.metadata import version

        hd_version = tuple(int(x) for x in version("highdicom").split(".")[:2])
    except Exception:  # noqa: BLE001 - not installed: need_highdicom says so
        return
    import numpy

    if hd_version < (0, 23) and not hasattr(numpy, "float_"):
        numpy.float_ = numpy.float64
        logger.info("highdicom %s on numpy %s: numpy.float_ alias restored for it", ".".join(map(str, hd_version)),
                    numpy.__version__)


def need_fhir():
    try:
        from fhir.resources.specimen import Specimen  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise ExportUnavailable(
            f"FHIR export needs the fhir.resources package ({exc.__class__.__name__}: {exc}); install it with "
            f"'pip install \"smartbiopsy[export]\"' or accept the installation offered by the SmartBiopsy panel"
        ) from None
    return Specimen


def export_requirements() -> list[str]:
    """Pip requirements of the export for THIS interpreter: highdicom 0.22 works with pydicom 2.x (Slicer 5.10 bundles
    2.4.4; never upgrade Slicer's pydicom), later highdicom needs pydicom >= 3. fhir.resources 8 is FHIR R5."""
    try:
        import pydicom

        major = int(str(pydicom.__version__).split(".")[0])
    except Exception:  # noqa: BLE001
        major = 3
    hd = "highdicom>=0.22,<0.23" if major < 3 else "highdicom>=0.23,<0.29"
    return [hd, "fhir.resources>=8.0,<9"]


def missing_export_requirements() -> list[str]:
    """The :func:`export_requirements` whose package cannot be imported here."""
    import importlib.util

    out = []
    for req, mod in zip(export_requirements(), ("highdicom", "fhir.resources")):
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            out.append(req)
    return out


def code(value: str, scheme: str, meaning: str):
    from pydicom.sr.coding import Code

    return Code(value, scheme, meaning)


#: UCUM units of the project's quantities (ADC is stored in 1e-6 mm^2/s = um2/s).
UNITS = {
    "adc": ("um2/s", "UCUM", "um2/s"),
    "ff": ("%", "UCUM", "%"),
    "ef": ("%", "UCUM", "%"),
    "mm": ("mm", "UCUM", "mm"),
    "deg": ("deg", "UCUM", "deg"),
}


def unit(name: str):
    return code(*UNITS[name])


#: Quantities: ADC has a DICOM code; fat and enhancing fraction use the project scheme.
QUANTITIES = {
    "adc": ("113041", "DCM", "Apparent Diffusion Coefficient"),
    "ff": ("FF", SCHEME, "Fat fraction"),
    "ef": ("EF", SCHEME, "Enhancing fraction"),
}

#: Segment categories and types (SNOMED CT), keyed by the project's structure names.
CAT_ALTERED = ("49755003", "SCT", "Morphologically Altered Structure")
CAT_ANATOMY = ("123037004", "SCT", "Anatomical Structure")
TYPE_NEOPLASM = ("108369006", "SCT", "Neoplasm")
RISK_TYPES = {
    "aorta": ("15825003", "SCT", "Aorta"),
    "ivc": ("64131007", "SCT", "Inferior vena cava"),
    "kidney": ("64033007", "SCT", "Kidney"),
    "bowel": ("113276009", "SCT", "Intestine"),
    "bone": ("272673000", "SCT", "Bone"),
}
GENERIC_ANATOMY = ("91723000", "SCT", "Anatomical structure")


@dataclass
class ExportedObject:
    """One file written by the export: kind (seg, pm, sr, fhir, source), path relative to the export folder,
    its UIDs (DICOM) or id (FHIR), what it contains, and the dciodvfy result once checked."""

    kind: str
    path: str
    description: str
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    references: dict = field(default_factory=dict)
    content: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

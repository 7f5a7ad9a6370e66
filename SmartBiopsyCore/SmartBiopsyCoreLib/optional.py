"""Optional packages that 3D Slicer does not bundle: matplotlib (figures) and pyradiomics (radiomic features).

Library code imports them only inside the function that needs them, through :func:`require`, which turns a
missing package into :class:`MissingPackageError`: one sentence saying what cannot be made, what is missing and
how to get it. Callers that can go on without the package (the report, the radiomics table) catch it, say so
in their output and complete the rest. Nothing here installs anything: inside Slicer the module widgets offer
the install (their ``Resources/requirements.txt``) and only after the user agreed.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from SmartBiopsyCoreLib.errors import SmartBiopsyError

#: Optional import name -> (distribution name, how a user gets it).
OPTIONAL_PACKAGES = {
    "matplotlib": ("matplotlib", "accept the matplotlib install the module offers in 3D Slicer, or run "
                                 "`pip install matplotlib` outside Slicer"),
    "radiomics": ("pyradiomics", "install SlicerRadiomics from the Extensions Manager, or run "
                                 "`pip install pyradiomics` outside Slicer"),
}


class MissingPackageError(SmartBiopsyError, ImportError):
    """An optional package is not installed; the message says what needs it and how to install it.

    Also an :class:`ImportError`, so code that already treats a missing import as "skip this part" keeps working.
    """


def missing_sentence(name: str, purpose: str) -> str:
    """The one sentence for a missing optional package ``name`` (import name) needed for ``purpose``."""
    dist, how = OPTIONAL_PACKAGES.get(name, (name, f"install it with `pip install {name}`"))
    return f"{purpose} not available: {how} ({dist} is not installed)"


def require(name: str, purpose: str) -> ModuleType:
    """Import the optional package ``name`` or raise :class:`MissingPackageError` about ``purpose``.

    ``purpose`` names what cannot be made without it, e.g. "Fusion pictures".
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise MissingPackageError(missing_sentence(name, purpose)) from exc


def available(name: str) -> bool:
    """True when the optional package ``name`` (import name) imports."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True

"""SmartBiopsyCore: hidden library module shared by RegistrationFusion, SmartBiopsy and TrajectoryPlanner.

It has no user interface. Its package ``SmartBiopsyCoreLib`` holds geometry (RasVolume and the one LPS<->RAS
conversion), the error base, the progress/cancel protocol, data I/O (images, DICOM, volume nodes, scene
bundles, the MRI->CT transform schema), the headless runtime and the phantom generators.
"""
import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

HOMEPAGE = "https://github.com/smartbiopsy/SlicerSmartBiopsy"
#: The oldest 3D Slicer the extension supports (Python 3.12, numpy 2.0, scipy 1.13, pydicom 2.4, SimpleITK 2.5).
MINIMUM_SLICER_VERSION = "5.10"


def ensureRequirements(requirementsPath, requester) -> bool:
    """Offer to install the packages of a module's ``Resources/requirements.txt`` that are missing.

    Call it from the button handler that needs them (never at import or set-up): nothing is installed unless
    the user agrees in a dialog. Slicer 5.11+ asks through ``slicer.packaging.pip_ensure``; Slicer 5.10 gets
    ``confirmOkCancelDisplay`` and then ``slicer.util.pip_install``. Returns True when everything listed is
    installed afterwards, False when the user declined (the caller goes on without, and says what is missing).
    """
    import importlib.metadata
    import os

    if not os.path.exists(requirementsPath):
        return True
    try:
        import slicer.packaging

        pipEnsure = slicer.packaging.pip_ensure
    except (ImportError, AttributeError):
        pipEnsure = None
    if pipEnsure is not None:
        try:
            pipEnsure(slicer.packaging.load_requirements(requirementsPath), requester=requester)
        except RuntimeError:  # the user declined
            return False
        return True
    with open(requirementsPath) as fh:
        reqs = [line.split("#")[0].strip() for line in fh if line.split("#")[0].strip()]
    missing = []
    for req in reqs:
        try:
            importlib.metadata.version(req.split(">=")[0].strip())
        except importlib.metadata.PackageNotFoundError:
            missing.append(req)
    if not missing:
        return True
    if not slicer.util.confirmOkCancelDisplay(
            _("{requester} needs {pkgs}, which is not installed. Install it now from the Python package index?").format(
                requester=requester, pkgs=", ".join(missing))):
        return False
    slicer.util.pip_install(" ".join(missing))
    return True


class SmartBiopsyCore(ScriptedLoadableModule):
    """Shared library of the SmartBiopsy extension (hidden: no panel in the module list)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SmartBiopsy Core")
        self.parent.categories = ["IGT.SmartBiopsy"]
        self.parent.dependencies = []
        self.parent.hidden = True
        self.parent.contributors = ["SmartBiopsy contributors"]
        self.parent.helpText = _(
            "Library shared by the SmartBiopsy modules (geometry, I/O, errors, progress, phantoms). "
            f"Requires 3D Slicer {MINIMUM_SLICER_VERSION} or later. "
            f'See the <a href="{HOMEPAGE}/blob/main/Docs/Developers.md">developer guide</a>.')
        self.parent.acknowledgementText = _("Part of the SmartBiopsy extension.")


class SmartBiopsyCoreTest(ScriptedLoadableModuleTest):
    """Self-test: the shared library imports and its one LPS<->RAS conversion round-trips."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_lps_ras_round_trip()

    def test_lps_ras_round_trip(self):
        import numpy as np

        from SmartBiopsyCoreLib.geometry import lps_to_ras_matrix, ras_to_lps_matrix

        m = np.eye(4)
        m[:3, 3] = (1.0, 2.0, 3.0)
        self.assertTrue(np.allclose(lps_to_ras_matrix(ras_to_lps_matrix(m)), m))
        self.delayDisplay("SmartBiopsyCore library imports and converts LPS<->RAS")

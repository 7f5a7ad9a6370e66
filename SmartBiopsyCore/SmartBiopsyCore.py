"""SmartBiopsyCore: hidden library module shared by RegistrationFusion, SmartBiopsy and TrajectoryPlanner.

It has no user interface. Its package ``SmartBiopsyCoreLib`` holds geometry (RasVolume and the one LPS<->RAS
conversion), the error base, the progress/cancel protocol, data I/O (images, DICOM, volume nodes, scene
bundles, the MRI->CT transform schema), the headless runtime and the phantom generators.
"""
import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

HOMEPAGE = "https://github.com/smartbiopsy/SlicerSmartBiopsy"


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

import logging
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    WithinRange,
)

from slicer import (
    vtkMRMLLinearTransformNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
)

HOMEPAGE = "https://github.com/smartbiopsy/SlicerSmartBiopsy"


#
# RegistrationFusion
#


class RegistrationFusion(ScriptedLoadableModule):
    """CT-MRI fusion on skin capsule markers with registration quality assurance."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Registration Fusion")
        self.parent.categories = ["IGT.SmartBiopsy"]
        self.parent.dependencies = ["SmartBiopsyCore"]
        self.parent.contributors = ["SmartBiopsy contributors"]
        self.parent.helpText = _(
            "Fuse the diagnostic MRI with the planning CT through vitamin-oil skin capsules: detect the capsules "
            "in both scans, pair and register them (rigid, MRI to CT), optionally refine by mutual information, "
            "review the residual of every capsule and the predicted error at each target, then approve. "
            "Coordinates are RAS millimetres. "
            "Requires 3D Slicer 5.10 or later. "
            f'See the <a href="{HOMEPAGE}/blob/main/Docs/RegistrationFusion.md">user guide</a>.')
        self.parent.acknowledgementText = _(
            "The workflow follows Johnston et al., Acad Radiol 2024 (multiregional MRI-informed biopsy of "
            "retroperitoneal sarcoma) and Xu et al., Front Oncol 2025 (CT-MRI fusion on skin capsule markers "
            "for CT-guided biopsy).")


#
# RegistrationFusionParameterNode
#


@parameterNodeWrapper
class RegistrationFusionParameterNode:
    """
    ctVolume - planning CT (HU).
    mriVolume - anatomical MRI (T1/T2) showing the capsules.
    capsulesCT, capsulesMRI - capsule centres (RAS mm), editable.
    targets - optional CT-RAS points where the predicted registration error is reported.
    transform - the MRI to CT transform (output).
    refineAffine, refineDeformable - intensity refinement stages beyond rigid.
    maxFreMm, maxPredictedTreMm - QA pass limits (mm).
    foregroundOpacity - MRI opacity over the CT in the fused view.
    approved - the operator approved the registration.
    """

    ctVolume: vtkMRMLScalarVolumeNode
    mriVolume: vtkMRMLScalarVolumeNode
    capsulesCT: vtkMRMLMarkupsFiducialNode
    capsulesMRI: vtkMRMLMarkupsFiducialNode
    targets: vtkMRMLMarkupsFiducialNode
    transform: vtkMRMLLinearTransformNode
    refineAffine: bool = False
    refineDeformable: bool = False
    maxFreMm: Annotated[float, WithinRange(0.1, 10.0)] = 2.0
    maxPredictedTreMm: Annotated[float, WithinRange(0.1, 10.0)] = 3.0
    foregroundOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    approved: bool = False


#
# RegistrationFusionWidget
#


class RegistrationFusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingTable = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RegistrationFusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RegistrationFusionLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.detectCapsulesButton.connect("clicked(bool)", self.onDetectCapsules)
        self.ui.registerButton.connect("clicked(bool)", self.onRegister)
        self.ui.refineButton.connect("clicked(bool)", self.onRefine)
        self.ui.approveButton.connect("clicked(bool)", self.onApprove)
        self.ui.showFusionButton.connect("clicked(bool)", self.onShowFusion)
        self.ui.savePicturesButton.connect("clicked(bool)", self.onSavePictures)
        self.ui.qaTable.connect("itemChanged(QTableWidgetItem*)", self.onQATableItemChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        self.setParameterNode(None)
        self.logic.reset()

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.ctVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[RegistrationFusionParameterNode]) -> None:
        """Set and observe parameter node."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        pn = self._parameterNode
        states = self.logic.buttonStates(pn)
        self.ui.detectCapsulesButton.enabled = states["detect"]
        self.ui.registerButton.enabled = states["register"]
        self.ui.refineButton.enabled = states["refine"]
        self.ui.approveButton.enabled = states["approve"]
        self.ui.showFusionButton.enabled = states["showFusion"]
        self.ui.savePicturesButton.enabled = states["savePictures"]
        self.ui.capsulesCTMarkupsWidget.setCurrentNode(pn.capsulesCT if pn else None)
        self.ui.capsulesMRIMarkupsWidget.setCurrentNode(pn.capsulesMRI if pn else None)
        if pn and pn.approved:
            self.ui.approveButton.text = _("Approved")

    # ------------------------------------------------------------------ long work
    def _runWithProgress(self, title, work):
        """Run ``work(progress, shouldCancel)`` behind a cancellable progress dialog."""
        dialog = slicer.util.createProgressDialog(windowTitle=title, labelText=title, maximum=100)
        cancelled = []
        dialog.connect("canceled()", lambda: cancelled.append(True))

        def progress(fraction, message=""):
            dialog.setValue(int(round(100 * max(0.0, min(1.0, fraction)))))
            if message:
                dialog.setLabelText(message)
            slicer.app.processEvents()

        def shouldCancel():
            slicer.app.processEvents()
            return bool(cancelled) or dialog.wasCanceled

        try:
            return work(progress, shouldCancel)
        finally:
            dialog.close()

    # ------------------------------------------------------------------ handlers
    def onDetectCapsules(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Capsule detection failed."), waitCursor=True):
            pn = self._parameterNode
            pn.capsulesCT = self._runWithProgress(
                _("Detecting capsules in the CT"), lambda p, c: self.logic.detectCapsules(pn.ctVolume, "ct", p, c))
            pn.capsulesMRI = self._runWithProgress(
                _("Detecting capsules in the MRI"), lambda p, c: self.logic.detectCapsules(pn.mriVolume, "mr", p, c))
            self.ui.statusLabel.text = _("{ct} capsules in the CT, {mr} in the MRI; check and edit them, then register.").format(
                ct=pn.capsulesCT.GetNumberOfControlPoints(), mr=pn.capsulesMRI.GetNumberOfControlPoints())

    def onRegister(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
            self.logic.registerParameterNode(self._parameterNode)
            self._showQA()

    def onRefine(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Intensity refinement failed."), waitCursor=True):
            pn = self._parameterNode
            refinement = self._runWithProgress(
                _("Refining the registration"), lambda p, c: self.logic.refineParameterNode(pn, p, c))
            self._showQA()
            self.ui.statusLabel.text = refinement.reason

    def onApprove(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Approval failed."), waitCursor=True):
            if slicer.util.confirmOkCancelDisplay(self.logic.approvalQuestion()):
                self.logic.approveParameterNode(self._parameterNode)

    def onShowFusion(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not set up the fused view."), waitCursor=True):
            pn = self._parameterNode
            slicer.util.setSliceViewerLayers(background=pn.ctVolume, foreground=pn.mriVolume,
                                             foregroundOpacity=pn.foregroundOpacity, fit=True)

    def onOpacityChanged(self, value) -> None:
        pn = self._parameterNode
        if pn and pn.ctVolume and pn.mriVolume and pn.transform:
            slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def onSavePictures(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not write the fusion pictures."), waitCursor=True):
            folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for the fusion pictures"))
            if not folder:
                return
            from SmartBiopsyCore import ensureRequirements

            ensureRequirements(self.resourcePath("requirements.txt"), _("Registration Fusion"))  # matplotlib, asks first
            paths = self.logic.saveFusionPictures(self._parameterNode, folder)
            self.ui.statusLabel.text = _("Checkerboard and overlay written: {paths}").format(paths=", ".join(paths.values()))

    def onQATableItemChanged(self, item) -> None:
        if self._updatingTable or item.column() != 0:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not re-register without that capsule."), waitCursor=True):
            self.logic.setPairUsed(self._parameterNode, item.row(), item.checkState() == qt.Qt.Checked)
            self._showQA()

    def _showQA(self) -> None:
        from RegistrationFusionLib.logic import QA_COLUMNS, TARGET_COLUMNS

        qaRows, targetRows, summary = self.logic.qaTables()
        self._updatingTable = True
        try:
            table = self.ui.qaTable
            table.clear()
            table.setColumnCount(len(QA_COLUMNS))
            table.setHorizontalHeaderLabels([_(c) for c in QA_COLUMNS])
            table.setRowCount(len(qaRows))
            for row, (used, *values) in enumerate(qaRows):
                use = qt.QTableWidgetItem()
                use.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
                use.setCheckState(qt.Qt.Checked if used else qt.Qt.Unchecked)
                table.setItem(row, 0, use)
                for col, v in enumerate(values, start=1):
                    table.setItem(row, col, qt.QTableWidgetItem(self._text(v)))
            tre = self.ui.targetTreTable
            tre.clear()
            tre.setColumnCount(len(TARGET_COLUMNS))
            tre.setHorizontalHeaderLabels([_(c) for c in TARGET_COLUMNS])
            tre.setRowCount(len(targetRows))
            for row, values in enumerate(targetRows):
                for col, v in enumerate(values):
                    tre.setItem(row, col, qt.QTableWidgetItem(self._text(v)))
        finally:
            self._updatingTable = False
        self.ui.qaStatusLabel.text = summary
        self._checkCanApply()

    @staticmethod
    def _text(v) -> str:
        return f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))


#
# RegistrationFusionLogic
#


class RegistrationFusionLogic(ScriptedLoadableModuleLogic):
    """Thin adapter: the panel's actions live in RegistrationFusionLib.logic.FusionLogic (no dialogs here)."""

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from RegistrationFusionLib.logic import FusionLogic

        self.lib = FusionLogic(scene if scene is not None else slicer.mrmlScene)

    def getParameterNode(self):
        return RegistrationFusionParameterNode(super().getParameterNode())

    def reset(self) -> None:
        self.lib.reset()

    def buttonStates(self, pn) -> dict:
        return self.lib.button_states(pn, self.lib.state)

    def detectCapsules(self, volumeNode, modality, progress=None, shouldCancel=None):
        """Capsule point list (RAS mm) found in ``volumeNode``; ``modality`` 'ct' or 'mr'."""
        return self.lib.detect_capsules(volumeNode, modality, progress, shouldCancel)

    def registerParameterNode(self, pn, excludedPairs=()):
        """Register the capsules (from their own MRI coordinates) and run the QA; updates ``pn.transform``."""
        pn.approved = False
        pn.transform = self.lib.register(pn.capsulesCT, pn.capsulesMRI, pn.mriVolume, pn.transform, excludedPairs)
        return self.lib.qa_report(pn.targets, pn.maxFreMm, pn.maxPredictedTreMm)

    def setPairUsed(self, pn, pair, used):
        """Tick or untick one capsule pair and register again."""
        pn.approved = False
        pn.transform = self.lib.set_pair_used(pair, used, pn.capsulesCT, pn.capsulesMRI, pn.mriVolume, pn.transform)
        return self.lib.qa_report(pn.targets, pn.maxFreMm, pn.maxPredictedTreMm)

    def refineParameterNode(self, pn, progress=None, shouldCancel=None):
        pn.approved = False
        result = self.lib.refine(pn.ctVolume, pn.mriVolume, pn.transform, pn.targets, pn.refineAffine,
                                 pn.refineDeformable, progress, shouldCancel)
        self.lib.qa_report(pn.targets, pn.maxFreMm, pn.maxPredictedTreMm)
        return result

    def qaTables(self):
        """(QA rows, target rows, summary line) of the current registration."""
        from RegistrationFusionLib import logic

        report = self.lib.state.report
        return (logic.qa_rows(report, self.lib.state.excluded_pairs), logic.target_rows(report),
                logic.qa_summary(report))

    def approvalQuestion(self) -> str:
        return self.lib.approval_question()

    def approveParameterNode(self, pn) -> None:
        """Record the approval on the transform node (read by the planner and the robot bridge)."""
        self.lib.approve(pn.transform)
        pn.approved = True

    def saveFusionPictures(self, pn, folder) -> dict:
        return self.lib.save_fusion_pictures(pn.ctVolume, pn.mriVolume, pn.transform, pn.targets, folder)

    def process(self, ctNode, mriNode, targetsNode=None, refineIntensity=True, progress=None, shouldCancel=None):
        """Whole fusion in one call: detect, match, register, refine, QA. Returns (transform node, FusionResult)."""
        return self.lib.fuse(ctNode, mriNode, targetsNode, refineIntensity, None, progress, shouldCancel)

    def processParameterNode(self, pn: RegistrationFusionParameterNode, progress=None, shouldCancel=None):
        transformNode, result = self.lib.fuse(pn.ctVolume, pn.mriVolume, pn.targets, True, pn.transform,
                                              progress, shouldCancel)
        pn.transform = transformNode
        return result


#
# RegistrationFusionTest
#


class RegistrationFusionTest(ScriptedLoadableModuleTest):
    """Each test runs one scenario from RegistrationFusionLib.scenarios on a cleared scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.test_landmark_registration()
        self.test_outlier_exclusion()
        self.test_rejects_collinear_capsules()
        self.test_logic_reregistration()
        self.test_parameter_node_reregistration()

    def _run(self, name):
        from RegistrationFusionLib import scenarios
        self.setUp()
        self.delayDisplay(f"Scenario {name}")
        result = scenarios.SCENARIOS[name](slicer.mrmlScene)
        logging.info("%s: %s", name, result)
        self.delayDisplay(f"Scenario {name} passed")

    def test_landmark_registration(self):
        self._run("landmark_registration")

    def test_outlier_exclusion(self):
        self._run("outlier_exclusion")

    def test_rejects_collinear_capsules(self):
        self._run("rejects_collinear_capsules")

    def test_logic_reregistration(self):
        self._run("logic_reregistration")

    def test_parameter_node_reregistration(self):
        """The widget's path: the module Logic on the real parameter node, Register clicked twice."""
        import numpy as np

        from RegistrationFusionLib import scenarios
        from RegistrationFusionLib.registration.mrml import matrix_from_transform_node

        self.setUp()
        logic = RegistrationFusionLogic()
        pn = logic.getParameterNode()
        pn.capsulesCT, pn.capsulesMRI, pn.mriVolume, _ = scenarios.reregistration_case(slicer.mrmlScene)
        logic.registerParameterNode(pn)
        first = matrix_from_transform_node(pn.transform)
        logic.registerParameterNode(pn)
        self.assertTrue(np.allclose(matrix_from_transform_node(pn.transform), first, atol=1e-4))
        self.assertFalse(pn.approved)

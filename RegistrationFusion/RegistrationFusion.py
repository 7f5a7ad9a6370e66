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

    QA_COLUMNS = ("use", "capsule pair", "residual (mm)", "expected (mm)", "leave-one-out (mm)", "note")

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._registration = None
        self._correspondence = None
        self._refinement = None
        self._report = None
        self._excludedPairs = set()
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
        self._registration = self._correspondence = self._refinement = self._report = None

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
        haveImages = bool(pn and pn.ctVolume and pn.mriVolume and pn.ctVolume != pn.mriVolume)
        haveCapsules = bool(pn and pn.capsulesCT and pn.capsulesMRI)
        self.ui.detectCapsulesButton.enabled = haveImages
        self.ui.registerButton.enabled = haveCapsules
        self.ui.refineButton.enabled = haveImages and self._registration is not None
        self.ui.approveButton.enabled = self._report is not None and bool(self._report.passed)
        self.ui.showFusionButton.enabled = haveImages and bool(pn and pn.transform)
        self.ui.savePicturesButton.enabled = haveImages and bool(pn and pn.transform)
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
                _("Detecting capsules in the CT"),
                lambda p, c: self.logic.detectCapsules(pn.ctVolume, "ct", p, c))
            pn.capsulesMRI = self._runWithProgress(
                _("Detecting capsules in the MRI"),
                lambda p, c: self.logic.detectCapsules(pn.mriVolume, "mr", p, c))
            self.ui.statusLabel.text = _("{ct} capsules in the CT, {mr} in the MRI; check and edit them, then register.").format(
                ct=pn.capsulesCT.GetNumberOfControlPoints(), mr=pn.capsulesMRI.GetNumberOfControlPoints())

    def onRegister(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
            self._excludedPairs = set()
            self._register()

    def _register(self) -> None:
        pn = self._parameterNode
        pn.approved = False
        self._correspondence, self._registration = self.logic.registerCapsules(
            pn.capsulesCT, pn.capsulesMRI, excludedPairs=sorted(self._excludedPairs))
        self._refinement = None
        pn.transform = self.logic.applyTransform(self._registration.matrix, pn.mriVolume, pn.capsulesMRI, pn.transform)
        self._updateQA()

    def onRefine(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Intensity refinement failed."), waitCursor=True):
            pn = self._parameterNode
            pn.approved = False
            self._refinement = self._runWithProgress(
                _("Refining the registration"),
                lambda p, c: self.logic.refine(pn.ctVolume, pn.mriVolume, self._registration, pn.targets,
                                               affine=pn.refineAffine, deformable=pn.refineDeformable,
                                               progress=p, shouldCancel=c))
            pn.transform = self.logic.applyTransform(self._refinement.matrix, pn.mriVolume, pn.capsulesMRI, pn.transform)
            self._updateQA()
            self.ui.statusLabel.text = self._refinement.reason

    def onApprove(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Approval failed."), waitCursor=True):
            if not slicer.util.confirmOkCancelDisplay(
                    _("Approve this registration for targeting? FRE {fre:.2f} mm; largest predicted TRE {tre:.2f} mm.").format(
                        fre=self._report.fre_mm,
                        tre=max([t.predicted_tre_mm for t in self._report.targets], default=float("nan")))):
                return
            self._parameterNode.approved = True
            self.logic.markApproved(self._parameterNode.transform, self._report)

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
            pn = self._parameterNode
            paths = self.logic.saveFusionPictures(pn.ctVolume, pn.mriVolume, pn.transform, pn.targets, folder)
            self.ui.statusLabel.text = _("Checkerboard and overlay written: {paths}").format(paths=", ".join(paths.values()))

    def onQATableItemChanged(self, item) -> None:
        if self._updatingTable or item.column() != 0:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not re-register without that capsule."), waitCursor=True):
            pair = item.row()
            if item.checkState() == qt.Qt.Checked:
                self._excludedPairs.discard(pair)
            else:
                self._excludedPairs.add(pair)
            self._register()

    def _updateQA(self) -> None:
        pn = self._parameterNode
        self._report = self.logic.qaReport(self._registration, pn.targets, self._correspondence, self._refinement,
                                           pn.maxFreMm, pn.maxPredictedTreMm)
        self._updatingTable = True
        try:
            table = self.ui.qaTable
            table.clear()
            table.setColumnCount(len(self.QA_COLUMNS))
            table.setHorizontalHeaderLabels(list(self.QA_COLUMNS))
            markers = self._report.markers
            table.setRowCount(len(markers))
            excluded = {e["pair_index"]: e["reason"] for e in self._report.excluded}
            for row, m in enumerate(markers):
                use = qt.QTableWidgetItem()
                use.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
                use.setCheckState(qt.Qt.Checked if row not in self._excludedPairs else qt.Qt.Unchecked)
                table.setItem(row, 0, use)
                values = (m["label"], m["residual_mm"], m["expected_residual_mm"], m["loo_mm"],
                          excluded.get(row, "excluded by you" if row in self._excludedPairs else ""))
                for col, v in enumerate(values, start=1):
                    text = f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))
                    table.setItem(row, col, qt.QTableWidgetItem(text))
            tre = self.ui.targetTreTable
            tre.clear()
            tre.setColumnCount(3)
            tre.setHorizontalHeaderLabels([_("target"), _("predicted TRE (mm)"), _("refinement shift (mm)")])
            tre.setRowCount(len(self._report.targets))
            for row, t in enumerate(self._report.targets):
                shift = "" if t.refinement_displacement_mm is None else f"{t.refinement_displacement_mm:.2f}"
                for col, text in enumerate((t.name, f"{t.predicted_tre_mm:.2f}", shift)):
                    tre.setItem(row, col, qt.QTableWidgetItem(text))
        finally:
            self._updatingTable = False
        verdict = _("QA passed") if self._report.passed else _("QA failed: ") + "; ".join(self._report.failures)
        self.ui.qaStatusLabel.text = _("FRE {fre:.2f} mm. {verdict}").format(fre=self._report.fre_mm, verdict=verdict)
        self._checkCanApply()


#
# RegistrationFusionLogic
#


class RegistrationFusionLogic(ScriptedLoadableModuleLogic):
    """Thin adapter between the module GUI and RegistrationFusionLib (no dialogs here)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return RegistrationFusionParameterNode(super().getParameterNode())

    @staticmethod
    def _volume(node):
        from SmartBiopsyCoreLib.dataio.volumes_mrml import volume_from_node

        return volume_from_node(node)

    @staticmethod
    def _points(node):
        from RegistrationFusionLib.capsules.mrml import capsule_points_from_node

        return capsule_points_from_node(node)

    def detectCapsules(self, volumeNode, modality, progress=None, shouldCancel=None):
        """Capsule fiducial node (RAS mm) found in ``volumeNode``; ``modality`` 'ct' or 'mr'."""
        from RegistrationFusionLib.capsules import detection as capsules, mrml as capsules_mrml
        detection = capsules.detect_capsules(self._volume(volumeNode), modality, progress=progress,
                                             should_cancel=shouldCancel)
        return capsules_mrml.add_capsule_fiducials(slicer.mrmlScene, detection,
                                                   f"Capsules {volumeNode.GetName()}", locked=False)

    def registerCapsules(self, ctCapsulesNode, mriCapsulesNode, excludedPairs=()):
        """Pair and register the capsules (MRI to CT). Pairs in ``excludedPairs`` (switched off by the user)
        are left out of the fit. Returns (Correspondence, PointRegistration)."""
        from RegistrationFusionLib.registration import landmarks
        ct, mri = self._points(ctCapsulesNode), self._points(mriCapsulesNode)
        corr, reg = landmarks.register_capsules(ct, mri)
        if excludedPairs:
            keep = [i for i in range(len(corr.pairs)) if i not in set(excludedPairs)]
            labels = [reg.pair_labels[i] for i in keep]
            reg = landmarks.register_points(ct[corr.fixed_indices][keep], mri[corr.moving_indices][keep],
                                            exclude_outliers=False, pair_labels=labels)
        return corr, reg

    def refine(self, ctNode, mriNode, registration, targetsNode=None, affine=False, deformable=False,
               progress=None, shouldCancel=None):
        """Mutual-information refinement started from the landmark transform; returns RefinementResult."""
        from RegistrationFusionLib.registration import pipeline, refine
        targets = self._points(targetsNode) if targetsNode is not None else None
        return refine.refine_registration(
            self._volume(ctNode), self._volume(mriNode), registration.matrix,
            capsules_mri=registration.moving_points[registration.used],
            capsule_allowed_mm=pipeline.capsule_tolerance_mm(registration)[registration.used],
            targets_ct=targets, affine=affine, deformable=deformable, progress=progress, should_cancel=shouldCancel)

    def qaReport(self, registration, targetsNode, correspondence, refinement, maxFreMm, maxPredictedTreMm):
        from RegistrationFusionLib.registration import qa
        targets = None
        if targetsNode is not None:
            pts = self._points(targetsNode)
            targets = {targetsNode.GetNthControlPointLabel(i) or f"T{i + 1}": p for i, p in enumerate(pts)}
        return qa.build_report(registration, targets, correspondence=correspondence, refinement=refinement,
                               thresholds=qa.QAThresholds(max_fre_mm=maxFreMm, max_predicted_tre_mm=maxPredictedTreMm))

    def applyTransform(self, matrix, mriNode, mriCapsulesNode=None, transformNode=None):
        """Create/update the MRI to CT transform node and put the MRI (and its capsules) under it."""
        from RegistrationFusionLib.registration import mrml as registration_mrml
        nodes = registration_mrml.apply_registration(slicer.mrmlScene, matrix, [mriNode], transform_node=transformNode)
        if mriCapsulesNode is not None:
            mriCapsulesNode.SetAndObserveTransformNodeID(nodes["transform"].GetID())
        return nodes["transform"]

    def markApproved(self, transformNode, report) -> None:
        """Record the approval and the QA summary on the transform node (read by the planner and robot)."""
        import json

        transformNode.SetAttribute("SmartBiopsy.RegistrationApproved", "true")
        transformNode.SetAttribute("SmartBiopsy.RegistrationQA", json.dumps(report.to_dict(), default=float))

    def saveFusionPictures(self, ctNode, mriNode, transformNode, targetsNode, folder):
        from RegistrationFusionLib.registration import qa, refine, mrml as registration_mrml
        ct, mri = self._volume(ctNode), self._volume(mriNode)
        matrix = registration_mrml.matrix_from_transform_node(transformNode)
        onCt = refine.resample_mri_on_ct(mri, ct, matrix)
        point = self._points(targetsNode)[0] if targetsNode is not None and targetsNode.GetNumberOfControlPoints() \
            else 0.5 * sum(ct.bounds_ras())
        return qa.write_fusion_pictures(ct, onCt, point, folder)

    def process(self, ctNode, mriNode, targetsNode=None, refineIntensity=True, progress=None, shouldCancel=None):
        """Whole fusion in one call: detect, match, register, refine, QA. Returns (transform node, FusionResult)."""
        from RegistrationFusionLib.registration import pipeline
        targets = self._points(targetsNode) if targetsNode is not None else None
        result = pipeline.fuse_ct_mri(self._volume(ctNode), self._volume(mriNode), targets_ct=targets,
                                      do_refine=refineIntensity, progress=progress, should_cancel=shouldCancel)
        return self.applyTransform(result.matrix, mriNode), result

    def processParameterNode(self, pn: RegistrationFusionParameterNode, progress=None, shouldCancel=None):
        transformNode, result = self.process(pn.ctVolume, pn.mriVolume, pn.targets, True, progress, shouldCancel)
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

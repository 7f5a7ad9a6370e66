import logging
from pathlib import Path
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    Choice,
    WithinRange,
)

from slicer import (
    vtkMRMLLinearTransformNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsLineNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)

HOMEPAGE = "https://github.com/smartbiopsy/SlicerSmartBiopsy"
#: Needle catalogue names (TrajectoryPlannerLib.planning.needles); listed here because the Choice is made at import.
NEEDLES = ["15G/16G-16cm", "15G/16G-10cm", "17G/18G-10mm", "17G/18G-20mm", "17G/18G-endcut-20mm"]


#
# SmartBiopsy
#


class SmartBiopsy(ScriptedLoadableModule):
    """MRI habitats, one target per habitat, and the record of what each biopsy core sampled."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Smart Biopsy")
        self.parent.categories = ["IGT.SmartBiopsy"]
        self.parent.dependencies = ["SmartBiopsyCore"]
        self.parent.contributors = ["SmartBiopsy contributors"]
        self.parent.helpText = _(
            "Multiregional (smart) tumour biopsy: compute or import ADC, fat-fraction and enhancement-fraction "
            "maps, split the tumour into habitats A (low ADC, high EF), B (discordant) and C (high ADC, low EF) "
            "relative to the whole-tumour median, propose one target per habitat, measure what the biopsy notch "
            "sampled on the confirmation CT and keep the specimen record. ADC in 10^-6 mm^2/s, FF and EF in %, "
            "coordinates in RAS mm. "
            "Requires 3D Slicer 5.10 or later. "
            f'See the <a href="{HOMEPAGE}/blob/main/Docs/SmartBiopsy.md">user guide</a>.')
        self.parent.acknowledgementText = _(
            "The workflow follows Johnston et al., Acad Radiol 2024 (multiregional MRI-informed biopsy of "
            "retroperitoneal sarcoma) and Xu et al., Front Oncol 2025 (CT-MRI fusion on skin capsule markers "
            "for CT-guided biopsy).")


#
# SmartBiopsyParameterNode
#


@parameterNodeWrapper
class SmartBiopsyParameterNode:
    """
    dwiB1..dwiB3 - DWI volumes, one per b-value (node attribute SmartBiopsy.BValue, s/mm^2).
    dixonWater, dixonFat, t1Pre, t1Post - sources of FF and EF.
    adcMap (10^-6 mm^2/s), ffMap (%), efMap (%) - computed or imported maps on one MRI grid.
    registrationTransform - MRI to CT transform from Registration Fusion.
    habitatSegmentation, targets - outputs of the habitat step.
    confirmationCT, plannedTrajectory - needle check on the confirmation CT.
    notchShiftMm - manual shift of the notch region along the needle (mm, + = deeper).
    """

    dwiB1: vtkMRMLScalarVolumeNode
    dwiB2: vtkMRMLScalarVolumeNode
    dwiB3: vtkMRMLScalarVolumeNode
    excludeLowB: bool = False
    dixonWater: vtkMRMLScalarVolumeNode
    dixonFat: vtkMRMLScalarVolumeNode
    t1Pre: vtkMRMLScalarVolumeNode
    t1Post: vtkMRMLScalarVolumeNode
    adcMap: vtkMRMLScalarVolumeNode
    ffMap: vtkMRMLScalarVolumeNode
    efMap: vtkMRMLScalarVolumeNode
    registrationTransform: vtkMRMLLinearTransformNode
    habitatMode: Annotated[str, Choice(["median", "kmeans"])] = "median"
    needleErrorMm: Annotated[float, WithinRange(0.0, 10.0)] = 2.0
    notchLengthMm: Annotated[float, WithinRange(1.0, 40.0)] = 10.0
    habitatSegmentation: vtkMRMLSegmentationNode
    targets: vtkMRMLMarkupsFiducialNode
    confirmationCT: vtkMRMLScalarVolumeNode
    plannedTrajectory: vtkMRMLMarkupsLineNode
    needleModel: Annotated[str, Choice(NEEDLES)] = "15G/16G-16cm"
    notchMode: Annotated[str, Choice(["side-notch", "tip-distal"])] = "side-notch"
    notchShiftMm: Annotated[float, WithinRange(-20.0, 20.0)] = 0.0
    journalPath: Path
    potId: str = ""
    operatorName: str = ""
    participantId: str = ""
    scanLabel: str = ""
    scanDlpMgyCm: Annotated[float, WithinRange(0.0, 100000.0)] = 0.0
    reportFolder: Path


#
# SmartBiopsyWidget
#


class SmartBiopsyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._targets = []
        self._detection = None
        self._roi = None
        self._notchValues = None
        self._procedureLog = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SmartBiopsy.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SmartBiopsyLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.computeMapsButton.connect("clicked(bool)", self.onComputeMaps)
        self.ui.measureTumourButton.connect("clicked(bool)", self.onMeasureTumour)
        self.ui.computeHabitatsButton.connect("clicked(bool)", self.onComputeHabitats)
        self.ui.editHabitatsButton.connect("clicked(bool)", self.onEditHabitats)
        self.ui.detectNeedleButton.connect("clicked(bool)", self.onDetectNeedle)
        self.ui.updateNotchButton.connect("clicked(bool)", self.onUpdateNotch)
        self.ui.addPotButton.connect("clicked(bool)", self.onAddPot)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.importPathologyButton.connect("clicked(bool)", self.onImportPathology)
        self.ui.topogramButton.connect("clicked(bool)", self.onTopogram)
        self.ui.addScanButton.connect("clicked(bool)", self.onAddScan)
        self.ui.addManipulationButton.connect("clicked(bool)", self.onAddManipulation)
        self.ui.generateReportButton.connect("clicked(bool)", self.onGenerateReport)

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
        self._targets, self._detection, self._roi, self._notchValues = [], None, None, None

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.registrationTransform:
            transform = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLinearTransformNode")
            if transform:
                self._parameterNode.registrationTransform = transform

    def setParameterNode(self, inputParameterNode: Optional[SmartBiopsyParameterNode]) -> None:
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
        if not pn:
            return
        haveDwi = bool(pn.dwiB1 and pn.dwiB2)
        self.ui.computeMapsButton.enabled = haveDwi or bool(pn.dixonWater and pn.dixonFat) or bool(pn.t1Pre and pn.t1Post)
        haveTumour = bool(self.ui.tumourSegmentSelector.currentNode() and self.ui.tumourSegmentSelector.currentSegmentID())
        self.ui.measureTumourButton.enabled = haveTumour
        self.ui.computeHabitatsButton.enabled = haveTumour and bool(pn.adcMap and pn.efMap)
        self.ui.editHabitatsButton.enabled = bool(pn.habitatSegmentation)
        self.ui.detectNeedleButton.enabled = bool(pn.confirmationCT and pn.plannedTrajectory)
        self.ui.updateNotchButton.enabled = self._detection is not None
        journal = bool(str(pn.journalPath) not in ("", "."))
        self.ui.addPotButton.enabled = journal and self._notchValues is not None and bool(pn.potId)
        self.ui.exportCsvButton.enabled = journal
        self.ui.importPathologyButton.enabled = journal
        self.ui.generateReportButton.enabled = str(pn.reportFolder) not in ("", ".")

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

    @staticmethod
    def _fillTable(table, columns, rows) -> None:
        table.clear()
        table.setColumnCount(len(columns))
        table.setHorizontalHeaderLabels(list(columns))
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                text = f"{value:.1f}" if isinstance(value, float) else str(value)
                table.setItem(r, c, qt.QTableWidgetItem(text))

    # ------------------------------------------------------------------ maps, tumour, habitats
    def onComputeMaps(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not compute the maps."), waitCursor=True):
            pn = self._parameterNode
            dwi = [n for n in (pn.dwiB1, pn.dwiB2, pn.dwiB3) if n]
            nodes = self._runWithProgress(_("Computing ADC, FF and EF maps"), lambda p, c: self.logic.computeMaps(
                dwi, pn.excludeLowB, pn.dixonWater, pn.dixonFat, pn.t1Pre, pn.t1Post, p, c))
            pn.adcMap = nodes.get("adc") or pn.adcMap
            pn.ffMap = nodes.get("ff") or pn.ffMap
            pn.efMap = nodes.get("ef") or pn.efMap

    def onMeasureTumour(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not measure the tumour."), waitCursor=True):
            m = self.logic.measureTumour(self.ui.tumourSegmentSelector.currentNode(),
                                         self.ui.tumourSegmentSelector.currentSegmentID(), self._parameterNode.adcMap)
            notes = " ".join(m.notes)
            self.ui.tumourLabel.text = _("Voxel volume {v:.0f} ml; ellipsoid {e:.0f} ml. {notes}").format(
                v=m.voxel_volume_ml, e=m.ellipsoid_volume_ml, notes=notes)

    def onComputeHabitats(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not compute the habitats."), waitCursor=True):
            pn = self._parameterNode
            result = self.logic.processParameterNode(pn, self.ui.tumourSegmentSelector.currentNode(),
                                                     self.ui.tumourSegmentSelector.currentSegmentID())
            self._targets = result["targets"]
            rows = []
            for t in self._targets:
                sig = t.signature
                rows.append((t.region, sig.get("adc", {}).get("mean", float("nan")), sig.get("ef", {}).get("mean", float("nan")),
                             sig.get("ff", {}).get("mean", float("nan")), t.depth_mm, t.predicted_tre_mm,
                             "ok" if t.targetable else "; ".join(t.reasons)))
            self._fillTable(self.ui.targetsTable, (_("region"), _("ADC"), _("EF %"), _("FF %"), _("depth mm"),
                                                   _("TRE mm"), _("flags")), rows)
            missing = result["habitats"].missing
            self.ui.statusLabel.text = " ".join(missing.values()) if missing else _("Habitats A, B and C computed.")

    def onEditHabitats(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not open the Segment Editor."), waitCursor=True):
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(self._parameterNode.habitatSegmentation)
            if self._parameterNode.adcMap:
                editor.setSourceVolumeNode(self._parameterNode.adcMap)

    # ------------------------------------------------------------------ needle and notch
    def onDetectNeedle(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Needle detection failed."), waitCursor=True):
            pn = self._parameterNode
            self._detection = self._runWithProgress(_("Finding the needle"), lambda p, c: self.logic.detectNeedle(
                pn.confirmationCT, pn.plannedTrajectory, pn.needleModel, p, c))
            d = self._detection
            self.ui.needleLabel.text = _("Tip {tip:.1f} mm from the target: lateral {lat:.1f} mm, depth {dep:+.1f} mm, "
                                         "angle {ang:.1f} deg.").format(tip=d.tip_error_mm, lat=d.lateral_error_mm,
                                                                        dep=d.depth_error_mm, ang=d.angle_deg)
            self._updateNotch()

    def onUpdateNotch(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not measure the notch region."), waitCursor=True):
            self._updateNotch()

    def _updateNotch(self) -> None:
        pn = self._parameterNode
        self._roi, self._notchValues = self.logic.sampleNotch(
            self._detection, pn.notchMode, pn.needleModel, pn.notchShiftMm,
            {"adc": pn.adcMap, "ff": pn.ffMap, "ef": pn.efMap}, pn.registrationTransform)
        rows = [(name, s.mean, s.median, s.min, s.sd, s.volume_mm3, s.coverage)
                for name, s in self._notchValues.maps.items()]
        self._fillTable(self.ui.notchTable, (_("map"), _("mean"), _("median"), _("min"), _("SD"), _("mm3"),
                                             _("coverage")), rows)
        self._checkCanApply()

    # ------------------------------------------------------------------ specimens and log
    def onAddPot(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The specimen was not recorded."), waitCursor=True):
            pn = self._parameterNode
            region = self.logic.regionOfTarget(pn.plannedTrajectory)
            record = self.logic.addSpecimen(pn.journalPath, pn.potId, region, self._detection, self._roi,
                                            self._notchValues, pn.operatorName, pn.participantId)
            self.ui.statusLabel.text = _("Pot {pot} recorded at {time}.").format(pot=record.pot_id, time=record.time_utc)
            self._showSpecimens()

    def _showSpecimens(self) -> None:
        specimens, pathology = self.logic.journalState(self._parameterNode.journalPath)
        rows = []
        for pot, rec in specimens.items():
            adc = rec.values.get("adc")
            p = pathology.get(pot, {})
            rows.append((pot, rec.region, rec.target_name, rec.time_utc, "" if adc is None else adc.mean,
                         p.get("ki67_percent", "") if isinstance(p, dict) else getattr(p, "ki67_percent", "")))
        self._fillTable(self.ui.specimenTable, (_("pot"), _("region"), _("target"), _("time (UTC)"), _("ADC mean"),
                                                _("Ki-67 %")), rows)

    def onExportCsv(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            path = qt.QFileDialog.getSaveFileName(None, _("Export specimens for pathology"), "", "CSV (*.csv)")
            if path:
                self.logic.exportCsv(self._parameterNode.journalPath, path)
                self.ui.statusLabel.text = _("Exported to {path}.").format(path=path)

    def onImportPathology(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Pathology import failed; nothing was imported."), waitCursor=True):
            path = qt.QFileDialog.getOpenFileName(None, _("Pathology results"), "", "CSV (*.csv)")
            if path:
                report = self.logic.importPathology(self._parameterNode.journalPath, path)
                self.ui.statusLabel.text = _("Imported: {n} new, {c} corrected.").format(
                    n=len(report.added), c=len(report.corrected))
                self._showSpecimens()

    def _log(self):
        if self._procedureLog is None:
            self._procedureLog = self.logic.newProcedureLog(self._parameterNode.participantId,
                                                            self._parameterNode.operatorName)
        return self._procedureLog

    def _showLog(self) -> None:
        log = self._procedureLog
        self.ui.procedureLabel.text = _("DLP {dlp:.0f} mGy*cm; {mins} min since the planning topogram; "
                                        "manipulations {man}.").format(
            dlp=log.total_dlp_mgy_cm, mins="-" if log.elapsed_min is None else f"{log.elapsed_min:.0f}",
            man=log.manipulations)
        if log.window_exceeded:
            self.ui.procedureLabel.text += " " + _("The 60-minute window is exceeded.")
        self.logic.saveProcedureLog(self._parameterNode.journalPath, log)

    def onTopogram(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not record the topogram time."), waitCursor=True):
            self._log().set_planning_topogram(self.logic.nowUtc())
            self._showLog()

    def onAddScan(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not record the scan."), waitCursor=True):
            pn = self._parameterNode
            self._log().add_scan(pn.scanLabel, self.logic.nowUtc(), pn.scanDlpMgyCm)
            self._showLog()

    def onAddManipulation(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not record the manipulation."), waitCursor=True):
            self._log().add_manipulation(self.logic.regionOfTarget(self._parameterNode.plannedTrajectory))
            self._showLog()

    def onGenerateReport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Report generation failed."), waitCursor=True):
            from SmartBiopsyCore import ensureRequirements

            # matplotlib for the figures, offered first; declined: the report says which figures are missing
            ensureRequirements(self.resourcePath("requirements.txt"), _("Smart Biopsy report"))
            path = self._runWithProgress(_("Writing the report"), lambda p, c: self.logic.generateReport(
                self._parameterNode.reportFolder, self._parameterNode.journalPath))
            self.ui.statusLabel.text = _("Report written: {path}").format(path=path)


#
# SmartBiopsyLogic
#


class SmartBiopsyLogic(ScriptedLoadableModuleLogic):
    """Thin adapter between the module GUI and SmartBiopsyLib (no dialogs here)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SmartBiopsyParameterNode(super().getParameterNode())

    @staticmethod
    def _volume(node):
        from SmartBiopsyCoreLib.dataio.volumes_mrml import volume_from_node

        return volume_from_node(node)

    @staticmethod
    def _addVolume(volume, name):
        from SmartBiopsyCoreLib.dataio.volumes_mrml import add_volume_node

        return add_volume_node(slicer.mrmlScene, volume, name)

    def computeMaps(self, dwiNodes, excludeLowB=False, water=None, fat=None, pre=None, post=None,
                    progress=None, shouldCancel=None) -> dict:
        """ADC (10^-6 mm^2/s) from DWI nodes carrying SmartBiopsy.BValue, FF (%) from Dixon, EF (%) from T1."""
        from SmartBiopsyLib.characterise import maps
        from SmartBiopsyCoreLib.errors import InputDataError

        out = {}
        if dwiNodes:
            dwi = {}
            for node in dwiNodes:
                b = node.GetAttribute("SmartBiopsy.BValue")
                if b is None:
                    raise InputDataError(f"volume '{node.GetName()}' has no b-value; load the DWI series with SmartBiopsy "
                                         "so each b-value volume carries it")
                dwi[float(b)] = self._volume(node)
            out["adc"] = self._addVolume(maps.compute_adc(dwi, exclude_low_b=excludeLowB, progress=progress,
                                                          should_cancel=shouldCancel), "ADC")
        if water and fat:
            out["ff"] = self._addVolume(maps.compute_ff(self._volume(water), self._volume(fat)), "FF")
        if pre and post:
            out["ef"] = self._addVolume(maps.compute_ef(self._volume(pre), self._volume(post)), "EF")
        return out

    def tumourMask(self, segmentationNode, segmentId, referenceNode):
        """The tumour segment as a label RasVolume on ``referenceNode``'s grid."""
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "tumour mask")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap, referenceNode)
            return self._volume(labelmap)
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)

    def measureTumour(self, segmentationNode, segmentId, referenceNode):
        from SmartBiopsyLib.characterise import tumour
        return tumour.measure_tumour(self.tumourMask(segmentationNode, segmentId, referenceNode))

    def process(self, adcNode, efNode, ffNode, tumourMask, mode="median", transformNode=None,
                needleErrorMm=2.0, notchLengthMm=10.0) -> dict:
        """Habitats and targets; returns {"habitats": HabitatResult, "targets": [...], "nodes": {...}}."""
        import numpy as np

        from SmartBiopsyLib.characterise import mrml as characterisation_mrml, habitats, targets
        adc, ef = self._volume(adcNode), self._volume(efNode)
        ff = self._volume(ffNode) if ffNode else None
        mask = np.asarray(tumourMask.array) != 0
        result = habitats.compute_habitats(adc, ef, ff, mask, habitats.HabitatConfig(mode=mode))
        named = {"adc": adc, "ef": ef} | ({"ff": ff} if ff is not None else {})
        tre = self._predictedTre(transformNode)
        ts = targets.plan_targets(result.labels, named, tre, needleErrorMm, notchLengthMm)
        nodes = characterisation_mrml.characterisation_nodes(slicer.mrmlScene, result, ts)
        if transformNode is not None:
            for key in ("segmentation", "targets"):
                nodes[key].SetAndObserveTransformNodeID(transformNode.GetID())
        return {"habitats": result, "targets": ts, "nodes": nodes}

    @staticmethod
    def _predictedTre(transformNode):
        """Predicted TRE (mm) stored by Registration Fusion at approval, else None (1 mm default)."""
        import json

        text = transformNode.GetAttribute("SmartBiopsy.RegistrationQA") if transformNode is not None else None
        if not text:
            return None
        values = [t["predicted_tre_mm"] for t in json.loads(text).get("targets", [])]
        return max(values) if values else None

    def processParameterNode(self, pn: SmartBiopsyParameterNode, segmentationNode=None, segmentId=None) -> dict:
        mask = self.tumourMask(segmentationNode, segmentId, pn.adcMap)
        result = self.process(pn.adcMap, pn.efMap, pn.ffMap, mask, pn.habitatMode, pn.registrationTransform,
                              pn.needleErrorMm, pn.notchLengthMm)
        pn.habitatSegmentation = result["nodes"]["segmentation"]
        pn.targets = result["nodes"]["targets"]
        return result

    @staticmethod
    def _linePoints(lineNode):
        import numpy as np

        p0, p1 = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
        lineNode.GetNthControlPointPositionWorld(0, p0)
        lineNode.GetNthControlPointPositionWorld(1, p1)
        return np.array(p0), np.array(p1)

    def detectNeedle(self, ctNode, plannedLineNode, needleName, progress=None, shouldCancel=None):
        """Needle axis and tip in the confirmation CT near the planned path (entry = first line point)."""
        from SmartBiopsyLib.sampling import needle, mrml as sampling_mrml
        entry, target = self._linePoints(plannedLineNode)
        detection = needle.detect_needle(self._volume(ctNode), entry, target, target_name=plannedLineNode.GetName(),
                                         needle=needleName, progress=progress, should_cancel=shouldCancel)
        sampling_mrml.add_needle_line_node(slicer.mrmlScene, detection)
        return detection

    def sampleNotch(self, detection, mode, needleName, shiftMm, mapNodes, transformNode=None):
        """Notch ROI at the detected tip (shifted ``shiftMm`` along the needle) and each map's values in it."""
        from RegistrationFusionLib.registration.mrml import matrix_from_transform_node
        from SmartBiopsyLib.sampling import notch, mrml as sampling_mrml
        roi = notch.notch_roi(detection.tip_ras + float(shiftMm) * detection.axis, detection.axis, mode, needleName,
                              target_name=detection.target_name)
        maps = {k: self._volume(n) for k, n in mapNodes.items() if n is not None}
        m = matrix_from_transform_node(transformNode) if transformNode is not None else None
        values = notch.sample_maps(roi, maps, m)
        sampling_mrml.add_notch_roi_node(slicer.mrmlScene, roi)
        return roi, values

    @staticmethod
    def regionOfTarget(lineNode) -> str:
        """Habitat region (A/B/C) of a trajectory line node (attribute set by the planner)."""
        from SmartBiopsyCoreLib.errors import InputDataError

        region = lineNode.GetAttribute("TrajectoryPlanner.Region") if lineNode is not None else None
        if region not in ("A", "B", "C"):
            raise InputDataError("the selected trajectory has no habitat region; choose a trajectory planned by "
                                 "Trajectory Planner")
        return region

    def addSpecimen(self, journalPath, potId, region, detection, roi, notchValues, operator, participantId):
        from SmartBiopsyLib.records.specimen_journal import SpecimenJournal, SpecimenRecord, values_from_notch

        record = SpecimenRecord(pot_id=potId, region=region, target_name=detection.target_name,
                                needle_tip_ras=detection.tip_ras.tolist(), needle_direction_ras=detection.axis.tolist(),
                                notch_roi=roi.to_dict(), values=values_from_notch(notchValues), operator=operator,
                                participant_id=participantId)
        with SpecimenJournal(journalPath) as journal:
            return journal.append_specimen(record)

    def journalState(self, journalPath):
        from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

        with SpecimenJournal(journalPath) as journal:
            return dict(journal.specimens), dict(journal.pathology)

    def exportCsv(self, journalPath, csvPath):
        from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

        with SpecimenJournal(journalPath, create=False) as journal:
            return journal.export_csv(csvPath)

    def importPathology(self, journalPath, csvPath):
        from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

        with SpecimenJournal(journalPath, create=False) as journal:
            return journal.import_pathology_csv(csvPath)

    @staticmethod
    def newProcedureLog(participantId, operator):
        from SmartBiopsyLib.records.procedure_log import ProcedureLog

        return ProcedureLog(participant_id=participantId, operator=operator)

    @staticmethod
    def nowUtc() -> str:
        from SmartBiopsyLib.records.specimen_journal import utc_now_iso

        return utc_now_iso()

    def saveProcedureLog(self, journalPath, log) -> None:
        from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

        if str(journalPath) in ("", "."):
            return
        with SpecimenJournal(journalPath) as journal:
            journal.append_procedure(log)

    def generateReport(self, folder, journalPath):
        """Self-contained report.html in ``folder`` from the scene's results and the specimen journal."""
        from SmartBiopsyLib.report.writer import write_report

        return write_report(folder)


#
# SmartBiopsyTest
#


class SmartBiopsyTest(ScriptedLoadableModuleTest):
    """Each test runs one scenario from SmartBiopsyLib.scenarios on a cleared scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.test_maps_and_habitats()
        self.test_sampling_record()

    def _run(self, name):
        from SmartBiopsyLib import scenarios
        self.setUp()
        self.delayDisplay(f"Scenario {name}")
        result = scenarios.SCENARIOS[name](slicer.mrmlScene)
        logging.info("%s: %s", name, result)
        self.delayDisplay(f"Scenario {name} passed")

    def test_maps_and_habitats(self):
        self._run("maps_and_habitats")

    def test_sampling_record(self):
        self._run("sampling_record")

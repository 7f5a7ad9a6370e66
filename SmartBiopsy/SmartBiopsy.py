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
    dwiB1..dwiB3 - DWI volumes, one per b-value; their b-values (s/mm^2) come from the DICOM header of the series
      Slicer loaded (or the project's loader), or are typed in dwiB1BValue..dwiB3BValue (-1: from the header).
    tumourSegmentation, tumourSegmentId - the tumour segment (set from the segment selector).
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
    dwiB1BValue: Annotated[float, WithinRange(-1.0, 10000.0)] = -1.0
    dwiB2BValue: Annotated[float, WithinRange(-1.0, 10000.0)] = -1.0
    dwiB3BValue: Annotated[float, WithinRange(-1.0, 10000.0)] = -1.0
    excludeLowB: bool = False
    tumourSegmentation: vtkMRMLSegmentationNode
    tumourSegmentId: str = ""
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
    exportAccession: str = ""


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
        self.ui.exportHospitalButton.connect("clicked(bool)", self.onExportHospital)
        self.ui.tumourSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onTumourSegmentChanged)
        self.ui.tumourSegmentSelector.connect("currentSegmentChanged(QString)", self.onTumourSegmentChanged)

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
            if self._parameterNode.tumourSegmentation:
                self.ui.tumourSegmentSelector.setCurrentNode(self._parameterNode.tumourSegmentation)
                self.ui.tumourSegmentSelector.setCurrentSegmentID(self._parameterNode.tumourSegmentId)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def onTumourSegmentChanged(self, *args) -> None:
        """The tumour segment selector is not bound by the parameter node: copy its choice into it."""
        pn = self._parameterNode
        if pn:
            pn.tumourSegmentation = self.ui.tumourSegmentSelector.currentNode()
            pn.tumourSegmentId = self.ui.tumourSegmentSelector.currentSegmentID() or ""

    def _checkCanApply(self, caller=None, event=None) -> None:
        pn = self._parameterNode
        if not pn:
            return
        states = self.logic.buttonStates(pn)
        for name, enabled in states.items():
            getattr(self.ui, name + "Button").enabled = enabled

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
            self._runWithProgress(_("Computing ADC, FF and EF maps"), lambda p, c: self.logic.computeMapsParameterNode(pn, p, c))

    def onMeasureTumour(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not measure the tumour."), waitCursor=True):
            m = self.logic.measureTumourParameterNode(self._parameterNode)
            notes = " ".join(m.notes)
            self.ui.tumourLabel.text = _("Voxel volume {v:.0f} ml; ellipsoid {e:.0f} ml. {notes}").format(
                v=m.voxel_volume_ml, e=m.ellipsoid_volume_ml, notes=notes)

    def onComputeHabitats(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not compute the habitats."), waitCursor=True):
            result = self.logic.processParameterNode(self._parameterNode)
            from SmartBiopsyLib.logic import target_rows

            columns, rows = target_rows(result["targets"])
            self._fillTable(self.ui.targetsTable, columns, rows)
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
            d = self._runWithProgress(_("Finding the needle"), lambda p, c: self.logic.detectNeedleParameterNode(pn, p, c))
            self.ui.needleLabel.text = _("Tip {tip:.1f} mm from the planned notch tip: lateral {lat:.1f} mm, "
                                         "depth {dep:+.1f} mm, angle {ang:.1f} deg.").format(
                tip=d.tip_error_mm, lat=d.lateral_error_mm, dep=d.depth_error_mm, ang=d.angle_deg)
            self._updateNotch()

    def onUpdateNotch(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not measure the notch region."), waitCursor=True):
            self._updateNotch()

    def _updateNotch(self) -> None:
        _roi, values = self.logic.sampleNotchParameterNode(self._parameterNode)
        rows = [(name, s.mean, s.median, s.min, s.sd, s.volume_mm3, s.coverage) for name, s in values.maps.items()]
        self._fillTable(self.ui.notchTable, (_("map"), _("mean"), _("median"), _("min"), _("SD"), _("mm3"),
                                             _("coverage")), rows)
        self._checkCanApply()

    # ------------------------------------------------------------------ specimens and log
    def onAddPot(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The specimen was not recorded."), waitCursor=True):
            pn = self._parameterNode
            record = self.logic.addSpecimenParameterNode(pn)
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
        return self.logic.procedureLog(self._parameterNode)

    def _showLog(self) -> None:
        log = self._log()
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
                self._parameterNode, p))
            self.ui.statusLabel.text = _("Report written: {path}").format(path=path)

    def _ensureExportRequirements(self) -> None:
        """Install the export libraries (Resources/requirements.txt for Slicer's pydicom 2.4; the pins follow the
        interpreter's pydicom, see export_requirements) on first use, after asking."""
        from SmartBiopsyLib.export.common import export_requirements, missing_export_requirements

        if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):
            from packaging.requirements import Requirement

            slicer.packaging.pip_ensure([Requirement(r) for r in export_requirements()], requester=_("SmartBiopsy export"))
            return
        missing = missing_export_requirements()
        if missing and slicer.util.confirmOkCancelDisplay(
                _("The hospital export needs {pkgs}. Install now?").format(pkgs=", ".join(missing))):
            slicer.util.pip_install(" ".join(f'"{m}"' for m in missing))

    def onExportHospital(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The export failed."), waitCursor=True):
            self._ensureExportRequirements()
            result = self._runWithProgress(_("Exporting DICOM and FHIR"), lambda p, c: self.logic.exportForHospital(
                self._parameterNode, p))
            self.ui.statusLabel.text = _("Exported {what} to {path}").format(
                what=result.sentence(), path=result.out_dir)


#
# SmartBiopsyLogic
#


class SmartBiopsyLogic(ScriptedLoadableModuleLogic):
    """Thin adapter: the panel's actions live in SmartBiopsyLib.logic.BiopsyLogic (no dialogs here)."""

    def __init__(self, scene=None, fileForInstance=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from SmartBiopsyLib.logic import BiopsyLogic

        if fileForInstance is None and getattr(slicer, "dicomDatabase", None) is not None:
            fileForInstance = slicer.dicomDatabase.fileForInstance
        self.lib = BiopsyLogic(scene if scene is not None else slicer.mrmlScene, fileForInstance)

    def getParameterNode(self):
        return SmartBiopsyParameterNode(super().getParameterNode())

    def reset(self) -> None:
        self.lib.reset()

    def buttonStates(self, pn) -> dict:
        from SmartBiopsyLib.logic import button_states

        return button_states(pn, self.lib.state)

    def computeMaps(self, dwi, excludeLowB=False, water=None, fat=None, pre=None, post=None, progress=None,
                    shouldCancel=None) -> dict:
        """ADC from [(DWI node, typed b-value or -1), ...], FF from Dixon, EF from T1; new nodes by map name."""
        return self.lib.compute_maps(dwi, excludeLowB, water, fat, pre, post, progress, shouldCancel)

    def computeMapsParameterNode(self, pn, progress=None, shouldCancel=None) -> dict:
        nodes = self.computeMaps([(pn.dwiB1, pn.dwiB1BValue), (pn.dwiB2, pn.dwiB2BValue), (pn.dwiB3, pn.dwiB3BValue)],
                                 pn.excludeLowB, pn.dixonWater, pn.dixonFat, pn.t1Pre, pn.t1Post, progress, shouldCancel)
        pn.adcMap = nodes.get("adc") or pn.adcMap
        pn.ffMap = nodes.get("ff") or pn.ffMap
        pn.efMap = nodes.get("ef") or pn.efMap
        return nodes

    def measureTumourParameterNode(self, pn):
        return self.lib.measure_tumour(pn.tumourSegmentation, pn.tumourSegmentId, pn.adcMap)

    def process(self, adcNode, efNode, ffNode, tumourMask, mode="median", transformNode=None,
                needleErrorMm=2.0, notchLengthMm=10.0) -> dict:
        """Habitats and targets; returns {"habitats": HabitatResult, "targets": [...], "nodes": {...}}."""
        return self.lib.compute_habitats(adcNode, efNode, ffNode, tumourMask, mode, transformNode, needleErrorMm,
                                         notchLengthMm)

    def processParameterNode(self, pn: SmartBiopsyParameterNode) -> dict:
        mask = self.lib.tumour_mask(pn.tumourSegmentation, pn.tumourSegmentId, pn.adcMap)
        result = self.process(pn.adcMap, pn.efMap, pn.ffMap, mask, pn.habitatMode, pn.registrationTransform,
                              pn.needleErrorMm, pn.notchLengthMm)
        pn.habitatSegmentation = result["nodes"]["segmentation"]
        pn.targets = result["nodes"]["targets"]
        return result

    def detectNeedleParameterNode(self, pn, progress=None, shouldCancel=None):
        return self.lib.detect_needle(pn.confirmationCT, pn.plannedTrajectory, pn.needleModel, progress, shouldCancel)

    def sampleNotchParameterNode(self, pn):
        return self.lib.sample_notch(pn.notchMode, pn.needleModel, pn.notchShiftMm,
                                     {"adc": pn.adcMap, "ff": pn.ffMap, "ef": pn.efMap}, pn.registrationTransform)

    def addSpecimenParameterNode(self, pn):
        from SmartBiopsyLib.logic import region_of_target

        return self.lib.add_specimen(pn.journalPath, pn.potId, region_of_target(pn.plannedTrajectory),
                                     pn.operatorName, pn.participantId)

    def journalState(self, journalPath):
        return self.lib.journal_state(journalPath)

    def exportCsv(self, journalPath, csvPath):
        return self.lib.export_csv(journalPath, csvPath)

    def importPathology(self, journalPath, csvPath):
        return self.lib.import_pathology(journalPath, csvPath)

    def procedureLog(self, pn):
        return self.lib.procedure_log(pn.participantId, pn.operatorName)

    def nowUtc(self) -> str:
        return self.lib.now_utc()

    @staticmethod
    def regionOfTarget(lineNode) -> str:
        from SmartBiopsyLib.logic import region_of_target

        return region_of_target(lineNode)

    def saveProcedureLog(self, journalPath, log) -> None:
        self.lib.save_procedure_log(journalPath, log)

    def generateReport(self, pn, progress=None):
        """The case folder (the command line's layout) from the scene and this session, then report.html in it."""
        return self.lib.generate_report(pn.reportFolder, pn, progress)

    def exportForHospital(self, pn, progress=None):
        """The case folder, its DICOM/FHIR export in <report folder>/export, and the report listing it."""
        return self.lib.export_for_hospital(pn.reportFolder, pn, progress, accession=pn.exportAccession)


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
        self.test_logic_report()
        self.test_tumour_buttons_follow_the_selector()

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

    def test_logic_report(self):
        self._run("logic_report")

    def test_tumour_buttons_follow_the_selector(self):
        """The widget's path: the module Logic decides the tumour buttons from the real parameter node."""
        self.setUp()
        logic = SmartBiopsyLogic()
        pn = logic.getParameterNode()
        self.assertFalse(logic.buttonStates(pn)["measureTumour"])
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Tumour")
        pn.tumourSegmentation = seg
        pn.tumourSegmentId = seg.GetSegmentation().AddEmptySegment("tumour")
        self.assertTrue(logic.buttonStates(pn)["measureTumour"])
        self.assertFalse(logic.buttonStates(pn)["computeHabitats"])

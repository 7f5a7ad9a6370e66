import logging
import os
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
#: Needle catalogue names (TrajectoryPlannerLib.planning.needles.needle_names(); a static test keeps them equal).
NEEDLES = ["15G/16G-16cm", "15G/16G-10cm", "17G/18G-10mm", "17G/18G-20mm", "17G/18G-endcut-20mm"]
PHASES = ["START_UP", "CALIBRATION", "PLANNING", "TARGETING", "MOVE_TO_TARGET", "MANUAL"]
FRAME_MODELS = ["zframe-7tube", "spheres-6"]


#
# TrajectoryPlanner
#


class TrajectoryPlanner(ScriptedLoadableModule):
    """Margin-aware needle trajectories to the habitat targets and the bridge to a needle-guidance robot."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Trajectory Planner")
        self.parent.categories = ["IGT.SmartBiopsy"]
        self.parent.dependencies = ["SmartBiopsyCore"]
        self.parent.contributors = ["SmartBiopsy contributors"]
        self.parent.helpText = _(
            "Plan straight needle paths from the skin to each biopsy target that keep every risk structure "
            "(bone, gas, vessels, bowel, kidney and your own segments) at least its safety margin away, rank "
            "them by length, clearance and obliquity, reslice along a path, and send confirmed targets to a "
            "needle-guidance robot over OpenIGTLink. Coordinates in RAS mm, angles in degrees. "
            "Requires 3D Slicer 5.10 or later. "
            f'See the <a href="{HOMEPAGE}/blob/main/Docs/TrajectoryPlanner.md">user guide</a>.')
        self.parent.acknowledgementText = _(
            "The workflow follows Johnston et al., Acad Radiol 2024 (multiregional MRI-informed biopsy of "
            "retroperitoneal sarcoma) and Xu et al., Front Oncol 2025 (CT-MRI fusion on skin capsule markers "
            "for CT-guided biopsy).")


#
# TrajectoryPlannerParameterNode
#


@parameterNodeWrapper
class TrajectoryPlannerParameterNode:
    """
    ctVolume - planning CT (HU); targets - biopsy targets (RAS mm, labels A/B/C).
    riskSegmentation - user risk structures; each segment's margin is edited in the risk table.
    planningMode - "oblique" (robot, up to maxAngleDeg from the axial plane) or "in-plane" (freehand CT).
    patientPosition - excludes the table-side skin.
    robotHost/robotPort - OpenIGTLink server of the robot; robotPhase - workphase to request.
    registrationTransform - approved MRI to CT transform (its QA verdict gates robot motion).
    frameModel - the robot's fiducial frame in the CT (calibration); robotFrameIsCT - the operator states that
    the robot works in CT coordinates instead (logged).
    """

    ctVolume: vtkMRMLScalarVolumeNode
    targets: vtkMRMLMarkupsFiducialNode
    riskSegmentation: vtkMRMLSegmentationNode
    autoStructures: bool = True
    needleModel: Annotated[str, Choice(NEEDLES)] = "15G/16G-16cm"
    planningMode: Annotated[str, Choice(["oblique", "in-plane"])] = "oblique"
    maxAngleDeg: Annotated[float, WithinRange(0.0, 90.0)] = 60.0
    patientPosition: Annotated[str, Choice(["supine", "prone", "none"])] = "supine"
    topN: Annotated[int, WithinRange(1, 20)] = 5
    sharedEntry: bool = True
    selectedTrajectory: vtkMRMLMarkupsLineNode
    registrationTransform: vtkMRMLLinearTransformNode
    robotHost: str = "127.0.0.1"
    robotPort: Annotated[int, WithinRange(1, 65535)] = 18944
    robotPhase: Annotated[str, Choice(PHASES)] = "START_UP"
    frameModel: Annotated[str, Choice(FRAME_MODELS)] = "zframe-7tube"
    robotFrameIsCT: bool = False


#
# TrajectoryPlannerWidget
#


class TrajectoryPlannerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._result = None
        self._lineNodes = []
        self._session = None
        self._statusTimer = None
        self._calibration = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TrajectoryPlanner.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = TrajectoryPlannerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.refreshRiskButton.connect("clicked(bool)", self.onRefreshRiskTable)
        self.ui.computeButton.connect("clicked(bool)", self.onCompute)
        self.ui.resliceButton.connect("clicked(bool)", self.onReslice)
        self.ui.calibrateButton.connect("clicked(bool)", self.onCalibrate)
        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.phaseButton.connect("clicked(bool)", self.onPhase)
        self.ui.sendTargetButton.connect("clicked(bool)", self.onSendTarget)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.emergencyButton.connect("clicked(bool)", self.onEmergency)
        self.ui.trajectoriesTable.connect("cellClicked(int,int)", self.onTrajectoryClicked)

        self._statusTimer = qt.QTimer()
        self._statusTimer.setInterval(500)
        self._statusTimer.connect("timeout()", self._updateRobotStatus)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()
        if self._statusTimer:
            self._statusTimer.stop()
        self._shutdownRobot()

    def _shutdownRobot(self) -> None:
        """Module exit, scene close and application close: STOP first when motion may be in progress."""
        if self._session is not None:
            if not self.logic.shutdownRobot(self._session):
                slicer.util.errorDisplay(_("STOP was not acknowledged by the robot; stop the robot at its own console."))
            self._session = None

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        self._shutdownRobot()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        self._shutdownRobot()
        self._calibration = None
        self.setParameterNode(None)
        self._result = None

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

    def setParameterNode(self, inputParameterNode: Optional[TrajectoryPlannerParameterNode]) -> None:
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
        connected = self.logic.robotConnected(self._session)
        states = self.logic.buttonStates(pn, self._result is not None, connected)
        self.ui.computeButton.enabled = states["compute"]
        self.ui.resliceButton.enabled = states["reslice"]
        self.ui.phaseButton.enabled = states["phase"]
        self.ui.sendTargetButton.enabled = states["sendTarget"]
        # STOP and EMERGENCY are never disabled: with no session they say so instead of doing nothing.
        self.ui.stopButton.enabled = states["stop"]
        self.ui.emergencyButton.enabled = states["emergency"]
        self.ui.connectButton.text = _("Disconnect") if connected else _("Connect")

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

    # ------------------------------------------------------------------ planning
    def onRefreshRiskTable(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not list the risk structures."), waitCursor=True):
            from TrajectoryPlannerLib.logic import RISK_COLUMNS

            rows = self.logic.riskStructureRows(self._parameterNode.riskSegmentation, self._parameterNode.autoStructures)
            table = self.ui.riskTable
            table.clear()
            table.setColumnCount(len(RISK_COLUMNS))
            table.setHorizontalHeaderLabels([_(c) for c in RISK_COLUMNS])
            table.setRowCount(len(rows))
            for r, (name, source, margin) in enumerate(rows):
                for c, text in enumerate((name, source)):
                    item = qt.QTableWidgetItem(text)
                    item.setFlags(qt.Qt.ItemIsEnabled)
                    table.setItem(r, c, item)
                table.setItem(r, 2, qt.QTableWidgetItem(f"{margin:g}"))

    def _marginRows(self) -> list:
        table = self.ui.riskTable
        cells = [(table.item(r, 0), table.item(r, 2)) for r in range(table.rowCount)]
        return [(name.text(), margin.text()) for name, margin in cells if name is not None and margin is not None]

    def onCompute(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Planning failed."), waitCursor=True):
            pn = self._parameterNode
            margins = self.logic.margins(self._marginRows())
            self._result, self._lineNodes = self._runWithProgress(
                _("Planning trajectories"), lambda p, c: self.logic.processParameterNode(pn, margins, p, c))
            columns, rows = self.logic.trajectoryRows(self._result)
            table = self.ui.trajectoriesTable
            table.clear()
            table.setColumnCount(len(columns))
            table.setHorizontalHeaderLabels([_(c) for c in columns])
            table.setRowCount(len(rows))
            for r, values in enumerate(rows):
                for c, text in enumerate(values):
                    table.setItem(r, c, qt.QTableWidgetItem(text))
            self.ui.statusLabel.text = self._result.shared_entry_note or _("{n} trajectories planned.").format(
                n=len(self._result.trajectories))

    def onTrajectoryClicked(self, row, column) -> None:
        if self._result is not None and 0 <= row < len(self._lineNodes):
            self._parameterNode.selectedTrajectory = self._lineNodes[row]
            self.logic.showSelectedPath(self._lineNodes[row])

    def onReslice(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not reslice along the path."), waitCursor=True):
            layout = slicer.app.layoutManager()
            self.logic.reslice(self._parameterNode.selectedTrajectory, layout.sliceWidget("Red").mrmlSliceNode(),
                               layout.sliceWidget("Yellow").mrmlSliceNode())

    # ------------------------------------------------------------------ robot
    def onCalibrate(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The robot calibration failed."), waitCursor=True):
            from SmartBiopsyCore import ensureRequirements

            ensureRequirements(self.resourcePath("requirements.txt"), _("Trajectory Planner"))  # the picture; asks first
            pn = self._parameterNode
            self._calibration = None
            outDir = os.path.join(slicer.app.temporaryPath, "robot_calibration")
            result, _transform, _model = self.logic.calibrateRobot(pn.ctVolume, pn.frameModel, pn.targets, outDir=outDir)
            self._appendRobotMessage(_("calibration files in {folder}").format(folder=outDir))
            self._appendRobotMessage(self.logic.calibrationText(result))
            self._calibration = result if result.passed else None

    def onConnect(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not connect to the robot."), waitCursor=True):
            if self._session is not None:
                self._statusTimer.stop()
                self._shutdownRobot()
            else:
                pn = self._parameterNode
                statedBy = _("the operator at this workstation") if pn.robotFrameIsCT else ""
                self._session = self.logic.connectRobot(pn.robotHost, pn.robotPort, self._result, pn.registrationTransform,
                                                        os.path.join(slicer.app.temporaryPath, "robot_session.jsonl"),
                                                        calibration=self._calibration, robotFrameCTBy=statedBy)
                self._statusTimer.start()
            self._checkCanApply()

    def onPhase(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The robot refused the phase."), waitCursor=True):
            phase = self._parameterNode.robotPhase
            confirm = False
            if phase in ("TARGETING", "MOVE_TO_TARGET"):
                confirm = self._confirmMotion(phase)
                if not confirm:
                    return
            status = self.logic.robotCommand(self._session, phase, confirm)
            self._appendRobotMessage(f"{phase}: {status.status_string or 'OK'}")

    def _confirmMotion(self, what) -> bool:
        if not slicer.util.confirmOkCancelDisplay(
                _("{what} can move the robot. Confirm that the plan was reviewed and the registration QA passed.").format(what=what)):
            return False
        self.logic.confirmPlan(self._session, self._parameterNode.robotHost)
        return True

    def onSendTarget(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The target was not sent."), waitCursor=True):
            name = self._parameterNode.selectedTrajectory.GetAttribute("TrajectoryPlanner.Target")
            if not self._confirmMotion(_("Sending target {name}").format(name=name)):
                return
            target = self.logic.sendTarget(self._session, name)
            self._appendRobotMessage(f"target {name}: {target.state} {target.robot_status}")

    def onStop(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("STOP could not be delivered; stop the robot at the robot."), waitCursor=True):
            status = self.logic.robotStop(self._session)
            self._appendRobotMessage(f"STOP: {status.status_string or 'OK'}")

    def onEmergency(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("EMERGENCY could not be delivered; use the robot's emergency stop."), waitCursor=True):
            status = self.logic.robotEmergency(self._session)
            self._appendRobotMessage(f"EMERGENCY: {status.status_string or 'OK'}")

    def _appendRobotMessage(self, text) -> None:
        self.ui.robotMessages.append(text)

    def _updateRobotStatus(self) -> None:
        if self._session is None:
            return
        self.ui.robotStatusLabel.text = self.logic.robotStatusText(self._session)
        for msg in self.logic.takeRejections(self._session):
            self._appendRobotMessage(_("robot rejected: {text}").format(text=msg))
        self._checkCanApply()


#
# TrajectoryPlannerLogic
#


class TrajectoryPlannerLogic(ScriptedLoadableModuleLogic):
    """Thin adapter: the panel's actions live in TrajectoryPlannerLib.logic (no dialogs here)."""

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        return TrajectoryPlannerParameterNode(super().getParameterNode())

    @staticmethod
    def buttonStates(pn, haveResult=False, connected=False) -> dict:
        from TrajectoryPlannerLib import logic

        return logic.button_states(pn, haveResult, connected)

    @staticmethod
    def riskStructureRows(segmentationNode, autoStructures=True) -> list:
        """(name, source, default margin mm) for the automatic structures and every segment, hidden ones too."""
        from TrajectoryPlannerLib import logic

        return logic.risk_structure_rows(segmentationNode, autoStructures)

    @staticmethod
    def margins(rows) -> dict:
        from TrajectoryPlannerLib import logic

        return logic.margins_from_rows(rows)

    @staticmethod
    def trajectoryRows(result):
        from TrajectoryPlannerLib import logic

        return logic.trajectory_rows(result)

    def process(self, ctNode, targetsNode, segmentationNode=None, needle="15G/16G-16cm", margins=None,
                mode="oblique", maxAngleDeg=60.0, position="supine", topN=5, sharedEntry=True, autoStructures=True,
                progress=None, shouldCancel=None):
        """Plan and show the trajectories. Returns (PlanResult, [line node per trajectory, in table order])."""
        from TrajectoryPlannerLib import logic

        return logic.plan(self.scene, ctNode, targetsNode, segmentationNode, needle, margins, mode, maxAngleDeg,
                          position, topN, sharedEntry, autoStructures, progress, shouldCancel)

    def showSelectedPath(self, lineNode) -> None:
        """Show the path selected in the table (a hidden candidate leaves its folder while selected)."""
        from TrajectoryPlannerLib import logic

        logic.show_selected_path(self.scene, lineNode)

    def processParameterNode(self, pn: TrajectoryPlannerParameterNode, margins=None, progress=None, shouldCancel=None):
        return self.process(pn.ctVolume, pn.targets, pn.riskSegmentation, pn.needleModel, margins, pn.planningMode,
                            pn.maxAngleDeg, pn.patientPosition, pn.topN, pn.sharedEntry, pn.autoStructures,
                            progress, shouldCancel)

    @staticmethod
    def reslice(lineNode, inPlaneSliceNode, acrossSliceNode=None) -> dict:
        """In-plane view through entry and target, across view at the target."""
        from TrajectoryPlannerLib import logic

        return logic.reslice_along_path(lineNode, inPlaneSliceNode, acrossSliceNode)

    # robot panel: forwards to TrajectoryPlannerLib.logic (the protocol lives in TrajectoryPlannerLib.robot)
    @staticmethod
    def connectRobot(host, port, result, transformNode, logPath, calibration=None, robotFrameCTBy=""):
        from TrajectoryPlannerLib import logic

        return logic.connect_robot(host, port, result, transformNode, logPath, calibration=calibration,
                                   robot_frame_ct_by=robotFrameCTBy)

    @staticmethod
    def shutdownRobot(session) -> bool:
        from TrajectoryPlannerLib import logic

        return logic.shutdown_robot(session)

    def calibrateRobot(self, ctNode, frameModel, targetsNode=None, progress=None, shouldCancel=None, outDir=None):
        from TrajectoryPlannerLib import logic

        return logic.calibrate_robot(self.scene, ctNode, frameModel, targetsNode, progress, shouldCancel, out_dir=outDir)

    @staticmethod
    def calibrationText(result) -> str:
        from TrajectoryPlannerLib import logic

        return logic.calibration_text(result)

    @staticmethod
    def robotConnected(session) -> bool:
        from TrajectoryPlannerLib import logic

        return logic.robot_connected(session)

    @staticmethod
    def confirmPlan(session, operator) -> None:
        from TrajectoryPlannerLib import logic

        logic.confirm_plan(session, operator)

    @staticmethod
    def robotCommand(session, phase, confirm=False):
        from TrajectoryPlannerLib import logic

        return logic.robot_command(session, phase, confirm)

    @staticmethod
    def sendTarget(session, name):
        from TrajectoryPlannerLib import logic

        return logic.send_target(session, name)

    @staticmethod
    def robotStop(session):
        from TrajectoryPlannerLib import logic

        return logic.robot_stop(session)

    @staticmethod
    def robotEmergency(session):
        from TrajectoryPlannerLib import logic

        return logic.robot_emergency(session)

    @staticmethod
    def robotStatusText(session) -> str:
        from TrajectoryPlannerLib import logic

        return logic.robot_status_text(session)

    @staticmethod
    def takeRejections(session) -> list:
        from TrajectoryPlannerLib import logic

        return logic.take_rejections(session)


#
# TrajectoryPlannerTest
#


class TrajectoryPlannerTest(ScriptedLoadableModuleTest):
    """Each test runs one scenario from TrajectoryPlannerLib.scenarios on a cleared scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.test_plan_three_targets()
        self.test_rejects_target_in_bone()
        self.test_robot_safety()
        self.test_logic_hidden_segments_and_reslice()

    def _run(self, name):
        from TrajectoryPlannerLib import scenarios
        self.setUp()
        self.delayDisplay(f"Scenario {name}")
        result = scenarios.SCENARIOS[name](slicer.mrmlScene)
        logging.info("%s: %s", name, result)
        self.delayDisplay(f"Scenario {name} passed")

    def test_plan_three_targets(self):
        self._run("plan_three_targets")

    def test_rejects_target_in_bone(self):
        self._run("rejects_target_in_bone")

    def test_robot_safety(self):
        self._run("robot_safety")

    def test_logic_hidden_segments_and_reslice(self):
        self._run("logic_hidden_segments_and_reslice")

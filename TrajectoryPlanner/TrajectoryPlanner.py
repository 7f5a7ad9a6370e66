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
        self._session = None
        self._statusTimer = None

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
        if self._session is not None:
            self._session.close()
            self._session = None

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
        self.ui.computeButton.enabled = bool(pn.ctVolume and pn.targets and pn.targets.GetNumberOfControlPoints())
        self.ui.resliceButton.enabled = bool(pn.selectedTrajectory)
        connected = self._session is not None and self._session.client.connected
        self.ui.phaseButton.enabled = connected
        self.ui.sendTargetButton.enabled = connected and bool(pn.selectedTrajectory)
        # STOP and EMERGENCY are never disabled: with no session they say so instead of doing nothing.
        self.ui.stopButton.enabled = True
        self.ui.emergencyButton.enabled = True
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
            rows = self.logic.riskStructureRows(self._parameterNode.riskSegmentation, self._parameterNode.autoStructures)
            table = self.ui.riskTable
            table.clear()
            table.setColumnCount(3)
            table.setHorizontalHeaderLabels([_("structure"), _("source"), _("margin (mm)")])
            table.setRowCount(len(rows))
            for r, (name, source, margin) in enumerate(rows):
                for c, text in enumerate((name, source)):
                    item = qt.QTableWidgetItem(text)
                    item.setFlags(qt.Qt.ItemIsEnabled)
                    table.setItem(r, c, item)
                table.setItem(r, 2, qt.QTableWidgetItem(f"{margin:g}"))

    def _margins(self) -> dict:
        table = self.ui.riskTable
        out = {}
        for r in range(table.rowCount):
            name, margin = table.item(r, 0), table.item(r, 2)
            if name is not None and margin is not None:
                out[name.text()] = float(margin.text())
        return out

    def onCompute(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Planning failed."), waitCursor=True):
            pn = self._parameterNode
            margins = self._margins()
            self._result, nodes = self._runWithProgress(
                _("Planning trajectories"), lambda p, c: self.logic.processParameterNode(pn, margins, p, c))
            structures = sorted({k for t in self._result.trajectories for k in t.clearance_mm})
            table = self.ui.trajectoriesTable
            table.clear()
            columns = [_("name"), _("length mm"), _("angle deg"), _("score")] + [f"{s} mm" for s in structures]
            table.setColumnCount(len(columns))
            table.setHorizontalHeaderLabels(columns)
            table.setRowCount(len(self._result.trajectories))
            self._lineNodes = nodes
            for r, t in enumerate(self._result.trajectories):
                values = [t.name, f"{t.length_mm:.1f}", f"{t.angle_to_axial_deg:.1f}", f"{t.score:.3f}"]
                values += [f"{t.clearance_mm.get(s, float('nan')):.1f} (>= {t.margin_mm.get(s, 0):g})" for s in structures]
                for c, text in enumerate(values):
                    table.setItem(r, c, qt.QTableWidgetItem(text))
            self.ui.statusLabel.text = self._result.shared_entry_note or _("{n} trajectories planned.").format(
                n=len(self._result.trajectories))

    def onTrajectoryClicked(self, row, column) -> None:
        if self._result is not None and 0 <= row < len(self._lineNodes):
            self._parameterNode.selectedTrajectory = self._lineNodes[row]

    def onReslice(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not reslice along the path."), waitCursor=True):
            entry, target = self.logic.linePoints(self._parameterNode.selectedTrajectory)
            sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            direction = target - entry
            direction = direction / (sum(direction ** 2) ** 0.5)
            helper = [0.0, 0.0, 1.0] if abs(direction[2]) < 0.9 else [1.0, 0.0, 0.0]
            sliceNode.SetSliceToRASByNTP(*helper, *direction, *target, 0)  # plane containing the path
            sliceNode.SetSliceOrigin(*((entry + target) / 2.0))
            yellow = slicer.app.layoutManager().sliceWidget("Yellow").mrmlSliceNode()
            yellow.SetSliceToRASByNTP(*direction, *helper, *target, 0)  # plane across the path at the target

    # ------------------------------------------------------------------ robot
    def onConnect(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not connect to the robot."), waitCursor=True):
            if self._session is not None:
                self._session.close()
                self._session = None
                self._statusTimer.stop()
            else:
                pn = self._parameterNode
                self._session = self.logic.connectRobot(pn.robotHost, pn.robotPort, self._result, pn.registrationTransform)
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
    """Thin adapter between the module GUI and TrajectoryPlannerLib (no dialogs here)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return TrajectoryPlannerParameterNode(super().getParameterNode())

    @staticmethod
    def _volume(node):
        from SmartBiopsyCoreLib.dataio.volumes_mrml import volume_from_node

        return volume_from_node(node)

    @staticmethod
    def linePoints(lineNode):
        import numpy as np

        p0, p1 = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
        lineNode.GetNthControlPointPositionWorld(0, p0)
        lineNode.GetNthControlPointPositionWorld(1, p1)
        return np.array(p0), np.array(p1)

    def riskStructureRows(self, segmentationNode, autoStructures=True) -> list:
        """(name, source, default margin mm) for the automatic and the user's structures."""
        from TrajectoryPlannerLib.planning.risk import default_margin

        rows = [(n, "CT", default_margin(n)) for n in ("bone", "gas")] if autoStructures else []
        if segmentationNode is not None:
            seg = segmentationNode.GetSegmentation()
            for i in range(seg.GetNumberOfSegments()):
                name = seg.GetNthSegment(i).GetName()
                rows.append((name, "segment", default_margin(name)))
        return rows

    def _userLabelmaps(self, segmentationNode, ctNode) -> list:
        """User segments as (label RasVolume on the CT grid, {value: name})."""
        if segmentationNode is None:
            return []
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "risk structures")
        try:
            slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(segmentationNode, labelmap, ctNode)
            seg = segmentationNode.GetSegmentation()
            names = {i + 1: seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())}
            return [(self._volume(labelmap), names)]
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)

    def process(self, ctNode, targetsNode, segmentationNode=None, needle="15G/16G-16cm", margins=None,
                mode="oblique", maxAngleDeg=60.0, position="supine", topN=5, sharedEntry=True, autoStructures=True,
                progress=None, shouldCancel=None):
        """Plan and show the trajectories. Returns (PlanResult, [line node per trajectory, in table order])."""
        from TrajectoryPlannerLib.planning import engine, mrml as planner_mrml
        targets = []
        for i in range(targetsNode.GetNumberOfControlPoints()):
            p = [0.0, 0.0, 0.0]
            targetsNode.GetNthControlPointPositionWorld(i, p)
            label = targetsNode.GetNthControlPointLabel(i) or f"T{i + 1}"
            targets.append({"name": label, "region": label if label in ("A", "B", "C") else "", "point_ras": p})
        settings = engine.PlanSettings(mode=mode, max_angle_deg=maxAngleDeg, top_n=topN, shared_entry=sharedEntry)
        result = engine.plan(self._volume(ctNode), targets, needle, self._userLabelmaps(segmentationNode, ctNode),
                             margins or None, settings, position, autoStructures, progress, shouldCancel)
        nodes = planner_mrml.add_trajectory_nodes(slicer.mrmlScene, result, include_shared=False)
        return result, nodes

    def processParameterNode(self, pn: TrajectoryPlannerParameterNode, margins=None, progress=None, shouldCancel=None):
        return self.process(pn.ctVolume, pn.targets, pn.riskSegmentation, pn.needleModel, margins, pn.planningMode,
                            pn.maxAngleDeg, pn.patientPosition, pn.topN, pn.sharedEntry, pn.autoStructures,
                            progress, shouldCancel)

    def connectRobot(self, host, port, result, transformNode):
        """Open a robot session with the best trajectory per target; the registration QA verdict comes from
        the approved transform (Registration Fusion)."""
        import json

        from TrajectoryPlannerLib.robot.protocol import RobotPlan, RobotSession

        best = {}
        for t in (result.trajectories if result is not None else []):
            if t.target not in best or t.rank < best[t.target].rank:
                best[t.target] = t
        qa = {}
        if transformNode is not None and transformNode.GetAttribute("SmartBiopsy.RegistrationApproved") == "true":
            qa = json.loads(transformNode.GetAttribute("SmartBiopsy.RegistrationQA") or "{}")
        plan = RobotPlan.from_dict({"trajectories": [
            {"name": name, "region": t.region, "entry_ras": list(t.entry_ras), "target_ras": list(t.target_ras)}
            for name, t in best.items()], "registration_qa": qa})
        session = RobotSession(host, int(port), log_path=os.path.join(slicer.app.temporaryPath, "robot_session.jsonl"))
        session.connect()
        session.load_plan(plan)
        return session

    @staticmethod
    def confirmPlan(session, operator) -> None:
        session.confirm_plan(operator or "operator")

    @staticmethod
    def robotCommand(session, phase, confirm=False):
        if phase == "CALIBRATION":
            session.calibrate()
            return session.last_status.get("CALIBRATION")
        return session.command(phase, confirm=confirm)

    @staticmethod
    def sendTarget(session, name):
        return session.send_target(name, confirm=True)

    @staticmethod
    def robotStop(session):
        from TrajectoryPlannerLib.errors import RobotBridgeError

        if session is None:
            raise RobotBridgeError("No robot session is connected; stop the robot at its own console.")
        return session.stop()

    @staticmethod
    def robotEmergency(session):
        from TrajectoryPlannerLib.errors import RobotBridgeError

        if session is None:
            raise RobotBridgeError("No robot session is connected; use the robot's own emergency stop.")
        return session.emergency()

    @staticmethod
    def robotStatusText(session) -> str:
        if not session.client.connected:
            return "disconnected"
        states = ", ".join(f"{t.name}: {t.state}" for t in (session.plan.targets if session.plan else []))
        last = ", ".join(f"{k} {v.status_string or 'OK'}" for k, v in session.last_status.items())
        return f"connected; {states}; {last}"

    @staticmethod
    def takeRejections(session) -> list:
        out = [m.status_string for m in session.rejections_reported]
        session.rejections_reported.clear()
        return out


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

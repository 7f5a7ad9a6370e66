"""What the Smart Biopsy panel does, on an explicit MRML scene (the module's Logic adapts to it).

MRML-glue layer: takes the scene and the nodes explicitly and may use Slicer's MRML classes, never
``slicer.app``, ``slicer.mrmlScene``, ``slicer.modules``, qt or dialogs. The widget binds its GUI to the
parameter node and calls :class:`BiopsyLogic` and the pure ``can_*`` functions; the module self-test and
``Testing/mrml`` call the same API. ADC in 10^-6 mm^2/s, FF and EF in %, b-values in s/mm^2, RAS mm.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from SmartBiopsyCoreLib.errors import InputDataError

logger = logging.getLogger(__name__)

#: A typed b-value field holding this means "take the b-value from the DICOM header".
B_FROM_HEADER = -1.0
#: Volume-node attribute set by Slicer's DICOM module: the instance UIDs of the files of the volume.
DICOM_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
#: Volume-node attributes of the project's own loader (SmartBiopsyCoreLib.dataio.volumes_mrml writes the volume's
#: meta ``b_value`` as ``SmartBiopsy.b_value`` and in the ``SmartBiopsy.Meta`` JSON).
B_VALUE_ATTRIBUTES = ("SmartBiopsy.b_value", "SmartBiopsy.BValue")
META_JSON_ATTRIBUTE = "SmartBiopsy.Meta"


def _loader_b_value(node) -> float | None:
    """b-value recorded on the node by the project's own loader, or None."""
    for attr in B_VALUE_ATTRIBUTES:
        text = node.GetAttribute(attr)
        if text not in (None, ""):
            try:
                return float(text)
            except ValueError:
                raise InputDataError(f"volume '{node.GetName()}' carries b-value '{text}', not a number; type its "
                                     "b-value (s/mm^2) next to the volume") from None
    text = node.GetAttribute(META_JSON_ATTRIBUTE)
    if text:
        try:
            b = json.loads(text).get("b_value")
        except (ValueError, AttributeError):
            b = None
        if b is not None:
            return float(b)
    return None


# ---------------------------------------------------------------------------------------------- b-values
def dicom_b_values_of_node(node, file_for_instance: Callable[[str], str] | None) -> list[float]:
    """Distinct b-values (s/mm^2) in the DICOM headers of the files Slicer loaded ``node`` from.

    ``file_for_instance(uid) -> path``: in Slicer ``slicer.dicomDatabase.fileForInstance``; any lookup works.
    Empty when the node was not loaded from DICOM, no lookup is given, or the headers carry no b-value.
    """
    uids = (node.GetAttribute(DICOM_UIDS_ATTRIBUTE) or "").split()
    if not uids or file_for_instance is None:
        return []
    import pydicom

    from SmartBiopsyCoreLib.dataio.dicomio import dicom_b_value

    found = set()
    for uid in uids:
        path = file_for_instance(uid)
        if not path:
            raise InputDataError(f"the DICOM file of volume '{node.GetName()}' (instance {uid}) is not in the DICOM "
                                 "database any more; re-import the DWI series")
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - unreadable file: one sentence
            raise InputDataError(f"the DICOM file {path} of volume '{node.GetName()}' cannot be read ({exc}); "
                                 "re-import the DWI series") from None
        b = dicom_b_value(ds)
        if b is not None:
            found.add(round(float(b), 3))
    return sorted(found)


def b_value_of_node(node, typed: float = B_FROM_HEADER, file_for_instance=None) -> float:
    """The b-value (s/mm^2) of one DWI volume: typed by the user (>= 0), else from the node (attribute written
    by the project's loader, or the DICOM header of the files Slicer loaded). A typed value that contradicts
    the header, a volume mixing several b-values, or none at all is refused with a sentence."""
    name = node.GetName()
    header = dicom_b_values_of_node(node, file_for_instance)
    if len(header) > 1:
        raise InputDataError(f"volume '{name}' mixes b-values {', '.join(f'{b:g}' for b in header)} s/mm^2; load each "
                             "b-value as its own volume (Slicer's DICOM module: one volume per b-value)")
    known = header[0] if header else _loader_b_value(node)
    if typed is not None and float(typed) >= 0:
        if known is not None and abs(known - float(typed)) > 0.5:
            raise InputDataError(f"the b-value typed for '{name}' ({float(typed):g}) differs from its DICOM header "
                                 f"({known:g} s/mm^2); correct or clear the typed value")
        return float(typed)
    if known is None:
        raise InputDataError(f"volume '{name}' has no b-value in its DICOM header; type its b-value (s/mm^2) "
                             "next to the volume")
    return float(known)


# ---------------------------------------------------------------------------------------------- button states
def _segment_exists(seg_node, segment_id) -> bool:
    return bool(seg_node is not None and segment_id and seg_node.GetSegmentation().GetSegment(segment_id) is not None)


def can_compute_maps(pn) -> bool:
    """Two DWI volumes, or Dixon water and fat, or pre- and post-contrast T1."""
    return bool((pn.dwiB1 and pn.dwiB2) or (pn.dixonWater and pn.dixonFat) or (pn.t1Pre and pn.t1Post))


def can_measure_tumour(pn) -> bool:
    """A tumour segment is chosen (segmentation node and an existing segment ID)."""
    return _segment_exists(pn.tumourSegmentation, pn.tumourSegmentId)


def can_compute_habitats(pn) -> bool:
    """A tumour segment plus the ADC and EF maps."""
    return can_measure_tumour(pn) and bool(pn.adcMap and pn.efMap)


def button_states(pn, state: "PanelState | None" = None) -> dict:
    """Enabled state of every button for parameter node ``pn`` (and what the panel measured so far)."""
    state = state or PanelState()
    journal = str(pn.journalPath) not in ("", ".")
    return {"computeMaps": can_compute_maps(pn), "measureTumour": can_measure_tumour(pn),
            "computeHabitats": can_compute_habitats(pn), "editHabitats": bool(pn.habitatSegmentation),
            "detectNeedle": bool(pn.confirmationCT and pn.plannedTrajectory),
            "updateNotch": state.detection is not None,
            "addPot": journal and state.notch_values is not None and bool(pn.potId),
            "exportCsv": journal, "importPathology": journal,
            "generateReport": str(pn.reportFolder) not in ("", "."),
            "exportHospital": str(pn.reportFolder) not in ("", ".")}


# ---------------------------------------------------------------------------------------------- state
@dataclass
class PanelState:
    """What the panel computed in this session (the report is written from it and from the scene)."""

    habitats: object = None            # HabitatResult
    targets: list = field(default_factory=list)   # characterise.targets.Target
    tumour_size: object = None         # TumourMeasurement
    detection: object = None           # NeedleDetection of the last needle check
    roi: object = None
    notch_values: object = None
    samples: dict = field(default_factory=dict)   # target name -> (detection, roi, notch values)
    procedure_log: object = None


def _volume(node):
    from SmartBiopsyCoreLib.dataio.volumes_mrml import volume_from_node

    return volume_from_node(node)


def _mri(node, role: str):
    """The MRI volume of ``node`` for ``role`` (e.g. "the Dixon fat image"), refused when it is a CT in HU."""
    from SmartBiopsyCoreLib.dataio.volumes_mrml import mri_from_node

    return mri_from_node(node, f"select {role}")


#: Columns of the panel's target table (what :func:`target_rows` fills).
TARGET_COLUMNS = ("region", "ADC", "EF %", "FF %", "depth mm", "error 95 % mm", "hit probability %", "flags")


def target_rows(targets) -> tuple[tuple, list[tuple]]:
    """(columns, rows) of the panel's target table: the region, its mean ADC (10^-6 mm^2/s), EF and FF (%), the
    depth inside the region and the predicted registration error (95th percentile, mm), the probability that the
    notch samples the region (%, with its Monte Carlo standard error; "not evaluated" when it was not computed)
    and the targetability flags."""
    nan = float("nan")
    rows = []
    for t in targets:
        sig = t.signature
        hp = getattr(t, "hit_probability", None)
        se = getattr(t, "hit_probability_se", None) or 0.0
        hit = "not evaluated" if hp is None else f"{100 * hp:.0f} \u00b1 {100 * se:.0f}"
        rows.append((t.region, sig.get("adc", {}).get("mean", nan), sig.get("ef", {}).get("mean", nan),
                     sig.get("ff", {}).get("mean", nan), t.depth_mm, t.predicted_tre_mm, hit,
                     "ok" if t.targetable else "; ".join(t.reasons)))
    return TARGET_COLUMNS, rows


def line_points(line_node) -> tuple[np.ndarray, np.ndarray]:
    """(entry, target) world RAS mm of a trajectory line node."""
    if line_node is None or line_node.GetNumberOfControlPoints() < 2:
        raise InputDataError("select a planned trajectory (a line from entry to target) first")
    p0, p1 = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    line_node.GetNthControlPointPositionWorld(0, p0)
    line_node.GetNthControlPointPositionWorld(1, p1)
    return np.array(p0), np.array(p1)


#: Line-node attribute written by the Trajectory Planner: the planned notch tip's distance (mm) beyond the target.
TIP_BEYOND_TARGET_ATTRIBUTE = "TrajectoryPlanner.TipBeyondTargetMM"
#: Largest believable distance of the planned notch tip beyond the target (mm); anything else is refused.
MAX_TIP_BEYOND_TARGET_MM = 60.0


def planned_tip(line_node) -> np.ndarray:
    """Where the plan puts the needle tip (world RAS mm): for a path planned by Trajectory Planner the planned notch
    tip, ``TrajectoryPlanner.TipBeyondTargetMM`` beyond the target (point 1) along the path, as the command line's
    needle check uses it; for a line drawn by hand (no attribute) its end point. A value that is not a number of
    mm between 0 and 60 is refused."""
    entry, target = line_points(line_node)
    text = line_node.GetAttribute(TIP_BEYOND_TARGET_ATTRIBUTE)
    if text in (None, ""):
        return target
    try:
        beyond = float(text)
    except ValueError:
        beyond = float("nan")
    if not np.isfinite(beyond) or not 0.0 <= beyond <= MAX_TIP_BEYOND_TARGET_MM:
        raise InputDataError(f"the trajectory '{line_node.GetName()}' says the needle tip goes '{text}' mm beyond the "
                             "target, not 0 to 60 mm; plan it again in Trajectory Planner")
    d = target - entry
    length = float(np.linalg.norm(d))
    if length < 1e-3:
        raise InputDataError("the selected trajectory's entry and target coincide; choose a planned trajectory")
    return target + beyond * d / length


def registration_error_p95(transform_node):
    """The approved registration's predicted error as a function ``f(point_mri) -> mm`` (95th percentile) at any
    point of the MRI world, or None when ``transform_node`` carries no registration QA.

    The QA stored by Registration Fusion at approval holds the capsule registration and its refinement, so the
    error model (capsule TRE + unmodelled deformation, ``error_model.predictor_from_qa``) is evaluated at each
    target as the command line does, whether or not targets were given to the QA. An intensity-only fusion
    gives its error estimate (taken as a 95th percentile) everywhere. A QA without either (stored by an older
    version, or damaged) is refused: the capsule TRE alone understates the error at a deep target."""
    from RegistrationFusionLib.errors import RegistrationFusionError
    from RegistrationFusionLib.registration.error_model import predictor_from_qa

    text = transform_node.GetAttribute("SmartBiopsy.RegistrationQA") if transform_node is not None else None
    if not text:
        return None
    qa = json.loads(text)
    redo = "run its QA again in Registration Fusion and approve it"
    if not isinstance(qa, dict):
        raise InputDataError(f"the registration QA on '{transform_node.GetName()}' is not a QA report; {redo}")
    if qa.get("method") == "intensity-only":
        est = qa.get("error_estimate_mm")
        if not isinstance(est, (int, float)) or isinstance(est, bool) or not np.isfinite(est) or est <= 0:
            raise InputDataError(f"the intensity-only fusion QA gives no valid error estimate; {redo}")
        return lambda point_mri: float(est)
    m = np.asarray(qa.get("matrix_mri_to_ct_ras", []), float)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise InputDataError(f"the registration QA gives no valid MRI-to-CT transform; {redo}")
    try:
        predict = predictor_from_qa(qa)  # refuses an incomplete QA before any target is planned
    except RegistrationFusionError as e:
        raise InputDataError(f"the approved registration gives no 95th-percentile error ({e}); {redo}") from e

    def p95(point_mri) -> float:
        p = np.asarray(point_mri, float).reshape(3)
        return float(predict({"t": m[:3, :3] @ p + m[:3, 3]}).targets[0].p95_mm)

    return p95


def region_of_target(line_node) -> str:
    """Habitat region (A/B/C) of a trajectory line node (attribute set by the planner)."""
    region = line_node.GetAttribute("TrajectoryPlanner.Region") if line_node is not None else None
    if region not in ("A", "B", "C"):
        raise InputDataError("the selected trajectory has no habitat region; choose a trajectory planned by "
                             "Trajectory Planner")
    return region


# ---------------------------------------------------------------------------------------------- target display
#: Attribute on the all-targets point list: what it is for (it is hidden in the views).
TARGETS_ROLE_ATTRIBUTE = "SmartBiopsy.Role"


def show_targets_per_habitat(scene, targets_node, targets: list) -> list:
    """Show the targets one colour per habitat, as the case scene does: one node "Target A" per target in the
    habitat's palette colour (:func:`SmartBiopsyLib.characterise.mrml.target_point_nodes`; a markups node has one
    colour for all its points), and hide ``targets_node`` (the single point list of every target the Trajectory
    Planner takes as input; it stays selectable, only its display is off). Returns the per-target nodes, in
    target order; the scene owns them."""
    from SmartBiopsyLib.characterise.mrml import target_point_nodes

    points = target_point_nodes(scene, targets)
    if targets_node is not None:
        targets_node.CreateDefaultDisplayNodes()
        for i in range(targets_node.GetNumberOfDisplayNodes()):
            display = targets_node.GetNthDisplayNode(i)
            if display is not None:
                display.SetVisibility(False)
        targets_node.SetAttribute(TARGETS_ROLE_ATTRIBUTE, "planner input (shown as Target A/B/C)")
    return points


class BiopsyLogic:
    """The panel's actions on ``scene``; one per panel (it keeps :class:`PanelState`)."""

    def __init__(self, scene, file_for_instance: Callable[[str], str] | None = None):
        if scene is None:
            raise InputDataError("no MRML scene given; pass the scene that holds the MRI and CT volumes")
        self.scene = scene
        self.file_for_instance = file_for_instance
        self.state = PanelState()

    def reset(self) -> None:
        self.state = PanelState()

    def _add_volume(self, volume, name):
        from SmartBiopsyCoreLib.dataio.volumes_mrml import add_volume_node

        return add_volume_node(self.scene, volume, name)

    # ------------------------------------------------------------------ maps, tumour, habitats
    def compute_maps(self, dwi=(), exclude_low_b=False, water=None, fat=None, pre=None, post=None,
                     progress=None, should_cancel=None) -> dict:
        """ADC (10^-6 mm^2/s) from ``dwi`` [(node, typed b or B_FROM_HEADER), ...], FF (%) from Dixon, EF (%)
        from T1; returns {"adc"|"ff"|"ef": new volume node} (the scene owns them)."""
        from SmartBiopsyLib.characterise import maps

        out = {}
        dwi = [(n, b) for n, b in dwi if n is not None]
        if dwi:
            volumes = {}
            for node, typed in dwi:
                b = b_value_of_node(node, typed, self.file_for_instance)
                if b in volumes:
                    raise InputDataError(f"two DWI volumes have b = {b:g} s/mm^2; choose volumes of different b-values")
                volumes[b] = _mri(node, f"the diffusion-weighted MRI of b = {b:g} s/mm^2")
            out["adc"] = self._add_volume(maps.compute_adc(volumes, exclude_low_b=exclude_low_b, progress=progress,
                                                           should_cancel=should_cancel), "ADC")
        if water and fat:
            out["ff"] = self._add_volume(maps.compute_ff(_mri(water, "the Dixon water image"),
                                                         _mri(fat, "the Dixon fat image")), "FF")
        if pre and post:
            out["ef"] = self._add_volume(maps.compute_ef(_mri(pre, "the T1 before contrast"),
                                                         _mri(post, "the T1 after contrast")), "EF")
        return out

    def tumour_mask(self, segmentation_node, segment_id, reference_node):
        """The tumour segment as a label RasVolume on ``reference_node``'s grid."""
        import vtk

        import slicer

        if not _segment_exists(segmentation_node, segment_id):
            raise InputDataError("choose the tumour segment first")
        if reference_node is None:
            raise InputDataError("compute or choose the ADC map first; the tumour is measured on its grid")
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "tumour mask")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segment_id)
            slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                                                   reference_node)
            try:
                vol = _volume(labelmap)
            except ValueError:
                raise InputDataError("the tumour segment is empty; segment the tumour first") from None
            return vol.with_array((np.asarray(vol.array) != 0).astype(np.uint8), name="tumour")
        finally:
            self.scene.RemoveNode(labelmap)

    def measure_tumour(self, segmentation_node, segment_id, reference_node):
        from SmartBiopsyLib.characterise import tumour

        self.state.tumour_size = tumour.measure_tumour(self.tumour_mask(segmentation_node, segment_id, reference_node))
        return self.state.tumour_size

    def compute_habitats(self, adc_node, ef_node, ff_node, tumour_mask, mode="median", transform_node=None,
                         needle_error_mm=2.0, notch_length_mm=10.0) -> dict:
        """Habitats and targets; returns {"habitats": HabitatResult, "targets": [...], "nodes": {...}}.

        Nodes (the scene owns them; MRI world, under ``transform_node`` when given): "segmentation" (segments A/B/C
        in the palette colours), "regions" (table), "targets" (one point list "Habitat targets" with every target,
        labelled A/B/C: the Trajectory Planner's input; its display is hidden) and "target_points" (what the views
        show, as in the case scene: one locked node "Target A" per target holding the point "target A", in the
        habitat's palette colour; see :func:`show_targets_per_habitat`)."""
        from SmartBiopsyLib.characterise import habitats, hitprob, mrml as characterisation_mrml, targets

        adc, ef = _volume(adc_node), _volume(ef_node)
        ff = _volume(ff_node) if ff_node else None
        mask = np.asarray(tumour_mask.array) != 0
        result = habitats.compute_habitats(adc, ef, ff, mask, habitats.HabitatConfig(mode=mode))
        named = {"adc": adc, "ef": ef} | ({"ff": ff} if ff is not None else {})
        p95 = registration_error_p95(transform_node)
        reg_error = None if p95 is None else (lambda p: hitprob.RegistrationError.from_p95(
            p95(p), "95th percentile of the approved registration's error model (Registration Fusion QA)"))
        ts = targets.plan_targets(result.labels, named, p95, needle_error_mm, notch_length_mm, registration_error=reg_error)
        nodes = characterisation_mrml.characterisation_nodes(self.scene, result, ts)
        nodes["target_points"] = show_targets_per_habitat(self.scene, nodes["targets"], ts)
        if transform_node is not None:
            for node in [nodes["segmentation"], nodes["targets"]] + nodes["target_points"]:
                node.SetAndObserveTransformNodeID(transform_node.GetID())
        self.state.habitats, self.state.targets = result, ts
        if self.state.tumour_size is None:
            from SmartBiopsyLib.characterise import tumour

            self.state.tumour_size = tumour.measure_tumour(tumour_mask)
        return {"habitats": result, "targets": ts, "nodes": nodes}

    # ------------------------------------------------------------------ needle and notch
    def detect_needle(self, ct_node, planned_line_node, needle_name, progress=None, should_cancel=None):
        """Needle axis and tip in the confirmation CT near the planned path (entry = first line point); the errors are
        measured against the planned notch tip (:func:`planned_tip`), as by the command line."""
        from SmartBiopsyLib.sampling import mrml as sampling_mrml, needle

        entry, _target = line_points(planned_line_node)
        tip = planned_tip(planned_line_node)  # the planned notch tip (beyond the target), as the command line uses
        name = planned_line_node.GetAttribute("TrajectoryPlanner.Target") or planned_line_node.GetName()
        from SmartBiopsyCoreLib.dataio.volumes_mrml import ct_from_node

        ct = ct_from_node(ct_node, "select the confirmation CT with the needle in place")
        detection = needle.detect_needle(ct, entry, tip, target_name=name, needle=needle_name,
                                         progress=progress, should_cancel=should_cancel)
        sampling_mrml.add_needle_line_node(self.scene, detection)
        self.state.detection, self.state.roi, self.state.notch_values = detection, None, None
        return detection

    def sample_notch(self, mode, needle_name, shift_mm, map_nodes: dict, transform_node=None):
        """Notch ROI at the detected tip (shifted ``shift_mm`` along the needle) and each map's values in it."""
        from RegistrationFusionLib.registration.mrml import matrix_from_transform_node
        from SmartBiopsyLib.sampling import mrml as sampling_mrml, notch

        d = self.state.detection
        if d is None:
            raise InputDataError("find the needle in the confirmation CT first")
        roi = notch.notch_roi(d.tip_ras + float(shift_mm) * d.axis, d.axis, mode, needle_name, target_name=d.target_name)
        maps = {k: _volume(n) for k, n in map_nodes.items() if n is not None}
        m = matrix_from_transform_node(transform_node) if transform_node is not None else None
        values = notch.sample_maps(roi, maps, m)
        sampling_mrml.add_notch_roi_node(self.scene, roi)
        self.state.roi, self.state.notch_values = roi, values
        self.state.samples[d.target_name] = (d, roi, values)
        return roi, values

    # ------------------------------------------------------------------ specimens and log
    def add_specimen(self, journal_path, pot_id, region, operator, participant_id):
        from SmartBiopsyLib.records.specimen_journal import SpecimenJournal, SpecimenRecord, values_from_notch

        d, roi, values = self.state.detection, self.state.roi, self.state.notch_values
        if d is None or values is None:
            raise InputDataError("find the needle and measure the notch region before recording the pot")
        record = SpecimenRecord(pot_id=pot_id, region=region, target_name=d.target_name,
                                needle_tip_ras=d.tip_ras.tolist(), needle_direction_ras=d.axis.tolist(),
                                notch_roi=roi.to_dict(), values=values_from_notch(values), operator=operator,
                                participant_id=participant_id)
        with SpecimenJournal(journal_path) as journal:
            return journal.append_specimen(record)

    @staticmethod
    def journal_state(journal_path):
        from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

        with SpecimenJournal(journal_path) as journal:
            return dict(journal.specimens), dict(journal.pathology)

    @staticmethod
    def export_csv(journal_path, csv_path):
        from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

        with SpecimenJournal(journal_path, create=False) as journal:
            return journal.export_csv(csv_path)

    @staticmethod
    def import_pathology(journal_path, csv_path):
        from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

        with SpecimenJournal(journal_path, create=False) as journal:
            return journal.import_pathology_csv(csv_path)

    def procedure_log(self, participant_id, operator):
        """The procedure log of this session (created on first use)."""
        from SmartBiopsyLib.records.procedure_log import ProcedureLog

        if self.state.procedure_log is None:
            self.state.procedure_log = ProcedureLog(participant_id=participant_id, operator=operator)
        return self.state.procedure_log

    @staticmethod
    def now_utc() -> str:
        from SmartBiopsyLib.records.specimen_journal import utc_now_iso

        return utc_now_iso()

    @staticmethod
    def save_procedure_log(journal_path, log) -> None:
        from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

        if str(journal_path) in ("", "."):
            return
        with SpecimenJournal(journal_path) as journal:
            journal.append_procedure(log)

    # ------------------------------------------------------------------ report
    def generate_report(self, folder, pn, progress=None) -> str:
        """Write the case folder (the command line's layout) from the scene's nodes and this session, then
        ``report.html`` in it; returns the report path. See :mod:`SmartBiopsyLib.report.scene_case`."""
        from SmartBiopsyLib.report.scene_case import case_from_parameter_node, write_case_folder
        from SmartBiopsyLib.report.writer import write_report

        case = case_from_parameter_node(self.scene, pn, self.state)
        write_case_folder(case, folder, progress)
        return write_report(folder)

    def export_for_hospital(self, folder, pn, progress=None, accession: str = ""):
        """Write the case folder (as :meth:`generate_report`), export it into ``<folder>/export`` (DICOM SEG, Parametric
        Maps, TID 1500 SR, FHIR Specimens; see :func:`SmartBiopsyLib.export.case.export_case`), then the report that
        lists the export; ``accession`` is the procedure's accession number (FHIR accession identifiers). Returns the
        ExportResult. Raises ExportUnavailable when highdicom/fhir.resources are absent."""
        from pathlib import Path

        from SmartBiopsyLib.export.case import export_case
        from SmartBiopsyLib.report.scene_case import case_from_parameter_node, write_case_folder
        from SmartBiopsyLib.report.writer import write_report

        progress = progress or (lambda f, m: None)
        case = case_from_parameter_node(self.scene, pn, self.state)
        write_case_folder(case, folder, lambda f, m: progress(0.3 * f, m))
        result = export_case(Path(folder), Path(folder) / "export", accession=str(accession or "").strip(),
                             progress=lambda f, m: progress(0.3 + 0.6 * f, m))
        write_report(folder)
        return result

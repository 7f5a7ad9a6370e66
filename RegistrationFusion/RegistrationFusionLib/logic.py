"""What the Registration Fusion panel does, on an explicit MRML scene (the module's Logic adapts to it).

MRML-glue layer: takes the scene and the nodes explicitly and may use Slicer's MRML classes, never
``slicer.app``, ``slicer.mrmlScene``, ``slicer.modules``, qt or dialogs. The widget binds its GUI to the
parameter node and calls :class:`FusionLogic`; the module self-test and ``Testing/mrml`` call the same API.

Frames: CT capsules and targets are CT-world RAS mm. MRI capsules are the capsules' own MRI coordinates:
the MRI capsule node (and the MRI volume) sit under the registration transform once registered, so their
*world* positions are already moved by the previous registration and must never be registered again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from RegistrationFusionLib.errors import RegistrationFusionError
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)

#: Node attributes written at approval (read by the planner, the robot bridge and the report).
APPROVED_ATTRIBUTE = "SmartBiopsy.RegistrationApproved"
QA_ATTRIBUTE = "SmartBiopsy.RegistrationQA"
#: What to do when the CT or the MRI selector holds the wrong kind of image.
SWAP_HINT = "select the planning CT as the CT and the anatomical MRI as the MRI (check that they are not swapped)"
#: Columns of the capsule QA table (the widget shows :func:`qa_rows` under them).
QA_COLUMNS = ("use", "capsule pair", "residual (mm)", "expected (mm)", "leave-one-out (mm)", "note")
TARGET_COLUMNS = ("target", "predicted error 95 % (mm)", "capsule TRE (mm)", "refinement shift (mm)")


def _matrix_to_world(transform_node) -> np.ndarray:
    import vtk

    from SmartBiopsyCoreLib.geometry import array_from_vtk_matrix

    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise RegistrationFusionError(f"transform '{transform_node.GetName()}' is not linear; harden or remove it first")
    vm = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(vm)
    return array_from_vtk_matrix(vm)


def world_points(node) -> np.ndarray:
    """World RAS positions (N, 3) mm of a point list (CT capsules, targets)."""
    n = node.GetNumberOfControlPoints()
    out = np.zeros((n, 3))
    for i in range(n):
        node.GetNthControlPointPositionWorld(i, out[i])
    return out


def mri_capsule_points(node, registration_transform=None) -> np.ndarray:
    """The MRI capsules (N, 3) in MRI-world RAS mm, whatever registration they are currently shown under.

    Control points are read in the node's own coordinates; when the node sits under ``registration_transform``
    only the transforms *above* that transform are applied (usually none), so a previous registration never
    enters the next one. A node under any other transform is taken in world coordinates.
    """
    n = node.GetNumberOfControlPoints()
    local = np.zeros((n, 3))
    for i in range(n):
        node.GetNthControlPointPosition(i, local[i])
    parent = node.GetParentTransformNode()
    if parent is None:
        return local
    if registration_transform is not None and parent.GetID() == registration_transform.GetID():
        m = _matrix_to_world(parent.GetParentTransformNode())
    else:
        m = _matrix_to_world(parent)
    return local @ m[:3, :3].T + m[:3, 3]


def named_targets(node) -> dict | None:
    """{label: CT-world RAS point} of a targets point list (unlabelled points become T1, T2...)."""
    if node is None:
        return None
    pts = world_points(node)
    return {node.GetNthControlPointLabel(i) or f"T{i + 1}": p for i, p in enumerate(pts)}


def qa_rows(report, excluded_pairs) -> list[tuple]:
    """Rows (used, label, residual, expected, leave-one-out, note) of the capsule QA table."""
    excluded = {e["pair_index"]: e["reason"] for e in report.excluded}
    rows = []
    for row, m in enumerate(report.markers):
        note = excluded.get(row, "excluded by you" if row in excluded_pairs else "")
        rows.append((row not in excluded_pairs, m["label"], m["residual_mm"], m["expected_residual_mm"],
                     m["loo_mm"], note))
    return rows


def target_rows(report) -> list[tuple]:
    """Rows (name, predicted 95th-percentile error mm, capsule RMS TRE mm, refinement shift mm or None) of the
    target table. The first is the one to trust: it adds the deformation the skin capsules cannot see."""
    return [(t.name, t.predicted_error_p95_mm, t.predicted_tre_mm, t.refinement_displacement_mm)
            for t in report.targets]


def qa_summary(report) -> str:
    """One line for the QA status label."""
    verdict = "QA passed" if report.passed else "QA failed: " + "; ".join(report.failures)
    return f"FRE {report.fre_mm:.2f} mm. {verdict}"


@dataclass
class FusionState:
    """The registration the panel is showing: pairing, fit, optional refinement, QA and the user's exclusions."""

    correspondence: object = None
    registration: object = None
    refinement: object = None
    report: object = None
    excluded_pairs: set = field(default_factory=set)


class FusionLogic:
    """The panel's actions on ``scene``; one instance per panel (it remembers the current registration)."""

    def __init__(self, scene):
        if scene is None:
            raise RegistrationFusionError("no MRML scene given; pass the scene that holds the CT and the MRI")
        self.scene = scene
        self.state = FusionState()

    def reset(self) -> None:
        """Forget the current registration (scene closed)."""
        self.state = FusionState()

    # ------------------------------------------------------------------ button states
    @staticmethod
    def button_states(pn, state: FusionState | None = None) -> dict:
        """Which buttons are enabled for parameter node ``pn`` (any object with the parameter-node fields)."""
        state = state or FusionState()
        images = bool(pn and pn.ctVolume and pn.mriVolume and pn.ctVolume != pn.mriVolume)
        capsules = bool(pn and pn.capsulesCT and pn.capsulesMRI)
        transform = bool(pn and pn.transform)
        return {"detect": images, "register": capsules, "refine": images and state.registration is not None,
                "approve": state.report is not None and bool(state.report.passed),
                "showFusion": images and transform, "savePictures": images and transform}

    # ------------------------------------------------------------------ steps
    def detect_capsules(self, volume_node, modality: str, progress=None, should_cancel=None):
        """Capsule point list (RAS mm, unlocked for editing) found in ``volume_node``; ``modality`` 'ct' or 'mr'.
        The scene owns the returned node."""
        from RegistrationFusionLib.capsules import detection, mrml as capsules_mrml
        from SmartBiopsyCoreLib.dataio.volumes_mrml import ct_from_node, mri_from_node

        mod = str(modality).lower()
        mod = "mr" if mod in ("mri", "mr", "t1", "t2") else mod  # the names detection.detect_capsules accepts
        if mod == "ct":
            volume = ct_from_node(volume_node, "select a CT, or choose MR as the modality for an MRI")
        elif mod == "mr":
            volume = mri_from_node(volume_node, "select an MRI, or choose CT as the modality for a CT")
        else:
            raise RegistrationFusionError(f"unknown modality '{modality}'; choose CT or MR")
        found = detection.detect_capsules(volume, modality, progress=progress,
                                          should_cancel=should_cancel)
        return capsules_mrml.add_capsule_fiducials(self.scene, found, f"Capsules {volume_node.GetName()}", locked=False)

    def register(self, ct_capsules_node, mri_capsules_node, mri_volume_node, transform_node=None,
                 excluded_pairs=()):
        """Pair and register the capsules (MRI to CT) without the pairs in ``excluded_pairs``; put the MRI volume
        and its capsules under the (created or updated) transform node, which is returned (the scene owns it).

        Always computed from the capsules' own MRI coordinates (:func:`mri_capsule_points`): registering again,
        or after excluding a pair, gives what registering from scratch gives.
        """
        from RegistrationFusionLib.registration import landmarks, mrml as registration_mrml

        ct = world_points(ct_capsules_node)
        mri = mri_capsule_points(mri_capsules_node, transform_node)
        corr, reg = landmarks.register_capsules(ct, mri)
        excluded = {int(i) for i in excluded_pairs}
        if excluded:
            keep = [i for i in range(len(corr.pairs)) if i not in excluded]
            if len(keep) < 3:
                raise RegistrationFusionError(f"only {len(keep)} capsule pairs are left in use; at least 3 "
                                              "non-collinear pairs are needed, tick more pairs")
            reg = landmarks.register_points(ct[corr.fixed_indices][keep], mri[corr.moving_indices][keep],
                                            exclude_outliers=False, pair_labels=[reg.pair_labels[i] for i in keep])
        self.state = FusionState(correspondence=corr, registration=reg, excluded_pairs=excluded)
        nodes = registration_mrml.apply_registration(self.scene, reg.matrix, [mri_volume_node],
                                                     transform_node=transform_node)
        tnode = nodes["transform"]
        tnode.RemoveAttribute(APPROVED_ATTRIBUTE)
        if mri_capsules_node.GetParentTransformNode() is None or \
                mri_capsules_node.GetParentTransformNode().GetID() != tnode.GetID():
            mri_capsules_node.SetAndObserveTransformNodeID(tnode.GetID())
        return tnode

    def set_pair_used(self, pair: int, used: bool, ct_capsules_node, mri_capsules_node, mri_volume_node,
                      transform_node):
        """Tick (``used``) or untick one capsule pair of the QA table and register again; returns the transform."""
        excluded = set(self.state.excluded_pairs)
        (excluded.discard if used else excluded.add)(int(pair))
        return self.register(ct_capsules_node, mri_capsules_node, mri_volume_node, transform_node, excluded)

    def refine(self, ct_node, mri_node, transform_node, targets_node=None, affine=False, deformable=False,
               progress=None, should_cancel=None):
        """Mutual-information refinement started from the current landmark registration; updates the transform
        node with the accepted matrix and returns the RefinementResult."""
        from RegistrationFusionLib.registration import mrml as registration_mrml, pipeline, refine
        from SmartBiopsyCoreLib.dataio.volumes_mrml import ct_from_node, mri_from_node

        reg = self.state.registration
        if reg is None:
            raise RegistrationFusionError("register the capsules before refining")
        targets = world_points(targets_node) if targets_node is not None else None
        result = refine.refine_registration(
            ct_from_node(ct_node, SWAP_HINT), mri_from_node(mri_node, SWAP_HINT), reg.matrix,
            capsules_mri=reg.moving_points[reg.used],
            capsule_allowed_mm=pipeline.capsule_tolerance_mm(reg)[reg.used],
            targets_ct=targets, affine=affine, deformable=deformable, progress=progress, should_cancel=should_cancel)
        self.state.refinement = result
        registration_mrml.apply_registration(self.scene, result.matrix, [mri_node], transform_node=transform_node)
        transform_node.RemoveAttribute(APPROVED_ATTRIBUTE)
        return result

    def qa_report(self, targets_node=None, max_fre_mm: float = 2.0, max_predicted_tre_mm: float = 3.0):
        """QA of the current registration (and refinement) with the panel's limits; kept in the state."""
        from RegistrationFusionLib.registration import qa

        if self.state.registration is None:
            raise RegistrationFusionError("register the capsules before the QA")
        self.state.report = qa.build_report(
            self.state.registration, named_targets(targets_node), correspondence=self.state.correspondence,
            refinement=self.state.refinement,
            thresholds=qa.QAThresholds(max_fre_mm=max_fre_mm, max_predicted_tre_mm=max_predicted_tre_mm))
        return self.state.report

    def approval_question(self) -> str:
        """The sentence the operator confirms before approving."""
        r = self.state.report
        if r is None:
            raise RegistrationFusionError("register the capsules and review the QA before approving")
        if not r.targets:
            return (f"Approve this registration for targeting? FRE {r.fre_mm:.2f} mm; no targets were given, so "
                    "no error is predicted at them.")
        p95 = max(t.predicted_error_p95_mm for t in r.targets)
        tre = max(t.predicted_tre_mm for t in r.targets)
        return (f"Approve this registration for targeting? FRE {r.fre_mm:.2f} mm; largest predicted error "
                f"{p95:.2f} mm (95th percentile, with unmodelled deformation; capsule TRE alone {tre:.2f} mm).")

    def approve(self, transform_node) -> None:
        """Record the approval and the QA summary on the transform node (fails closed without a passed QA)."""
        r = self.state.report
        if r is None or not r.passed:
            raise RegistrationFusionError("the registration QA has not passed; it cannot be approved")
        transform_node.SetAttribute(APPROVED_ATTRIBUTE, "true")
        transform_node.SetAttribute(QA_ATTRIBUTE, jsonio.dumps(r.to_dict(), default=float))

    def save_fusion_pictures(self, ct_node, mri_node, transform_node, targets_node, folder) -> dict:
        """Checkerboard and overlay PNGs of the MRI resampled on the CT, centred on the first target."""
        from RegistrationFusionLib.registration import mrml as registration_mrml, qa, refine
        from SmartBiopsyCoreLib.dataio.volumes_mrml import ct_from_node, mri_from_node

        ct, mri = ct_from_node(ct_node, SWAP_HINT), mri_from_node(mri_node, SWAP_HINT)
        on_ct = refine.resample_mri_on_ct(mri, ct, registration_mrml.matrix_from_transform_node(transform_node))
        if targets_node is not None and targets_node.GetNumberOfControlPoints():
            point = world_points(targets_node)[0]
        else:
            point = 0.5 * sum(ct.bounds_ras())
        return qa.write_fusion_pictures(ct, on_ct, point, folder)

    def fuse(self, ct_node, mri_node, targets_node=None, refine_intensity=True, transform_node=None,
             progress=None, should_cancel=None):
        """Whole fusion in one call (detect, pair, register, refine, QA). Returns (transform node, FusionResult)."""
        from RegistrationFusionLib.registration import mrml as registration_mrml, pipeline
        from SmartBiopsyCoreLib.dataio.volumes_mrml import ct_from_node, mri_from_node

        result = pipeline.fuse_ct_mri(ct_from_node(ct_node, SWAP_HINT), mri_from_node(mri_node, SWAP_HINT),
                                      targets_ct=named_targets(targets_node), do_refine=refine_intensity,
                                      progress=progress, should_cancel=should_cancel)
        nodes = registration_mrml.apply_registration(self.scene, result.matrix, [mri_node], transform_node=transform_node)
        return nodes["transform"], result

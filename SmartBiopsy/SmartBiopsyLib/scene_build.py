"""Build the case's Slicer scene from a finished (or partly finished) workflow run (MRML glue).

Every node is named, coloured and placed in a subject-hierarchy folder: Images, Registration, Habitats,
Plan, Robot (the fitted calibration frame), Sampling. MRI-derived volumes sit under the MRI->CT transform, so they overlay the CT when the
scene is opened in Slicer. Takes the scene explicitly; returns the number of nodes per class.

What a reader sees: one visible "Chosen path A/B/C" per target (habitat colour), the planned notch tips as
their own labelled points ("planned notch tip A", not "target"), every other candidate path and the
shared-entry alternatives hidden in the Plan folder's "Candidate paths (hidden)" sub-folder, the tumour and
the organs at risk as one segmentation ("Tumour and organs at risk"). Colours come from
``SmartBiopsyCoreLib.palette`` only: habitat B has one colour in the segmentation, the targets and the paths.
"""
from __future__ import annotations

import logging

import numpy as np

from SmartBiopsyCoreLib.palette import REGION_COLOURS  # noqa: F401 - the one set of habitat colours

logger = logging.getLogger(__name__)

#: Name of the Plan sub-folder that holds the candidate (not chosen) and shared-entry paths, hidden.
CANDIDATE_FOLDER = "Candidate paths (hidden)"


def _folder(sh, name: str, parent: int | None = None) -> int:
    return sh.CreateFolderItem(sh.GetSceneItemID() if parent is None else parent, name)


def _hide_folder(scene, sh, folder: int) -> None:
    """Hide a folder item itself, as Slicer's Data module does: a folder display node, visibility off (the
    headless subject hierarchy has no folder plugin to create it)."""
    disp = scene.AddNewNodeByClass("vtkMRMLFolderDisplayNode", sh.GetItemName(folder))
    disp.SetVisibility(False)
    sh.SetItemDataNode(folder, disp)


def _put(sh, node, folder: int) -> None:
    if node is None:
        return
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(folder, node)
    sh.SetItemParent(item, folder)


def _flatten(obj):
    if obj is None:
        return []
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _flatten(v)]
    if isinstance(obj, (list, tuple)):
        return [n for v in obj for n in _flatten(v)]
    return [obj] if hasattr(obj, "GetID") else []


def _tumour_and_risk(scene, run):
    """The tumour (placed in the CT world through the MRI->CT transform) and the risk labelmaps as one
    segmentation node, or None when the run has neither."""
    from SmartBiopsyLib.characterise.mrml import tumour_and_risk_segmentation

    res, inputs = run.results, run.inputs
    tumour = res.get("tumour")
    if tumour is None:
        tumour = getattr(inputs, "tumour", None)
    if tumour is not None and not hasattr(tumour, "ijk_to_ras"):
        tumour = None
    m = res.get("mri_to_ct")
    if tumour is not None and m is None:
        tumour = None  # without the fusion the MRI-world tumour has no place in the CT world
    return tumour_and_risk_segmentation(scene, tumour, getattr(inputs, "risk_labelmaps", None) or (), m)


def build_case_scene(scene, run) -> dict:
    """Populate ``scene`` with the run's nodes. ``run`` is a :class:`SmartBiopsyLib.workflow.CaseRun`."""
    from SmartBiopsyCoreLib.dataio.volumes_mrml import add_volume_node

    sh = scene.GetSubjectHierarchyNode()
    res, inputs = run.results, run.inputs
    f_img = _folder(sh, "Images")
    ct_node = add_volume_node(scene, inputs.ct, "Planning CT")
    _put(sh, ct_node, f_img)
    mri_nodes = []
    if inputs.mri_anatomical is not None:
        n = add_volume_node(scene, inputs.mri_anatomical, "MRI T2")
        _put(sh, n, f_img)
        mri_nodes.append(n)
    maps = res.get("maps") or {}
    names = {"adc": "ADC (1e-6 mm2 per s)", "ff": "Fat fraction (%)", "ef": "Enhancement fraction (%)"}
    for k, v in maps.items():
        n = add_volume_node(scene, v, names.get(k, k))
        _put(sh, n, f_img)
        mri_nodes.append(n)
    if getattr(inputs, "dce", None) is not None:
        # the DCE as ONE Sequence node (MRI world; index = seconds from the first frame)
        from SmartBiopsyCoreLib.dataio.volumes_mrml import add_time_series_node

        seq, _browser, _proxy = add_time_series_node(scene, inputs.dce.frames, inputs.dce.times_s, "DCE", "DCE")
        _put(sh, seq, f_img)
    m = res.get("mri_to_ct")
    if m is not None:
        from RegistrationFusionLib.registration.mrml import apply_registration

        f_reg = _folder(sh, "Registration")
        fusion = res.get("fusion")
        kw = {}
        if fusion is not None:
            lm = fusion.landmark
            kw = {"capsules_ct": np.asarray(lm.fixed_points), "capsules_mri": np.asarray(lm.moving_points)}
        reg_nodes = apply_registration(scene, m, mri_nodes, **kw)
        for node in reg_nodes.values():
            _put(sh, node, f_reg)
    hab = res.get("habitats")
    if hab is not None:
        from SmartBiopsyLib.characterise.mrml import characterisation_nodes

        f_hab = _folder(sh, "Habitats")
        nodes = characterisation_nodes(scene, hab, res.get("targets") or [], res.get("radiomics") or None,
                                       target_per_node=True)
        tnode = scene.GetFirstNodeByClass("vtkMRMLLinearTransformNode")
        for node in _flatten(nodes):
            if node is None:
                continue
            if tnode is not None and hasattr(node, "SetAndObserveTransformNodeID") and node.IsA("vtkMRMLTransformableNode"):
                node.SetAndObserveTransformNodeID(tnode.GetID())  # habitats and targets live in MRI world
            _put(sh, node, f_hab)
    seg = _tumour_and_risk(scene, run)
    if seg is not None:
        _put(sh, seg, _folder(sh, "Segmentation"))
    plan = res.get("plan")
    if plan is not None:
        from TrajectoryPlannerLib.planning.mrml import add_chosen_plan_nodes, add_skin_model_node

        f_plan = _folder(sh, "Plan")
        shown = add_chosen_plan_nodes(scene, plan, res.get("best_trajectories"))
        for node in shown["chosen"] + [shown["notch_tips"]]:
            _put(sh, node, f_plan)
        if shown["candidates"]:
            f_cand = _folder(sh, CANDIDATE_FOLDER, f_plan)
            for node in shown["candidates"]:
                _put(sh, node, f_cand)
            sh.SetItemAttribute(f_cand, "SmartBiopsy.Hidden", "1")
            sh.SetItemExpanded(f_cand, False)
            _hide_folder(scene, sh, f_cand)
        if res.get("skin_poly") is not None:
            _put(sh, add_skin_model_node(scene, res["skin_poly"]), f_plan)
    calibration = res.get("calibration")
    if calibration is not None:
        # the robot's fitted fiducial frame under the robot-to-CT transform, in a Robot folder
        from TrajectoryPlannerLib.calibration.mrml import add_calibration_nodes

        f_cal = _folder(sh, "Robot")
        for node in add_calibration_nodes(scene, calibration):
            _put(sh, node, f_cal)
    samples = res.get("samples") or []
    if samples:
        from SmartBiopsyLib.sampling.mrml import add_sampling_nodes

        f_s = _folder(sh, "Sampling")
        for t, det, roi, vals in samples:
            for node in _flatten(add_sampling_nodes(scene, det, roi, target_ras=getattr(t, "target_ras", None),
                                                    region=getattr(t, "region", None))):
                _put(sh, node, f_s)
    counts: dict = {}
    for cls in ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLLinearTransformNode",
                "vtkMRMLSegmentationNode", "vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsLineNode",
                "vtkMRMLMarkupsROINode", "vtkMRMLTableNode", "vtkMRMLModelNode"):
        counts[cls] = scene.GetNumberOfNodesByClass(cls)
    return counts

"""Every panel refuses an MRI where it needs a CT (and a CT where it needs an MRI) with the command line's
sentence, before any work: the same check (SmartBiopsyCoreLib.modality) the command line uses, through
volumes_mrml.ct_from_node / mri_from_node, on the phantom's CT and MRI in a real headless scene."""
from __future__ import annotations

import numpy as np
import pytest

from SmartBiopsyCoreLib.dataio.volumes_mrml import add_volume_node
from SmartBiopsyCoreLib.errors import InputDataError

NOT_CT = r"the volume '{}' does not look like a CT in Hounsfield units \(.+\); select"
NOT_MRI = r"the volume '{}' looks like a CT in Hounsfield units, not an MRI \(.+\); select"


@pytest.fixture
def nodes(scene, phantom0):
    ct = add_volume_node(scene, phantom0.ct, "Planning CT")
    t2 = add_volume_node(scene, phantom0.mri["t2"], "T2")
    fat = add_volume_node(scene, phantom0.mri["dixon_fat"], "Dixon fat")
    targets = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Targets")
    targets.AddControlPoint([0.0, 0.0, 0.0], "A")
    return {"ct": ct, "t2": t2, "fat": fat, "targets": targets}


def test_fusion_panel_refuses_the_ct_and_the_mri_swapped(scene, nodes):
    from RegistrationFusionLib.logic import FusionLogic

    logic = FusionLogic(scene)
    with pytest.raises(InputDataError, match=NOT_CT.format("T2") + " the planning CT as the CT"):
        logic.fuse(nodes["t2"], nodes["ct"], nodes["targets"])
    with pytest.raises(InputDataError, match=NOT_MRI.format("Planning CT")):
        logic.fuse(nodes["ct"], nodes["ct"], nodes["targets"])
    assert scene.GetNodesByClass("vtkMRMLLinearTransformNode").GetNumberOfItems() == 0  # nothing was added


def test_capsule_detection_refuses_an_image_of_the_other_modality(scene, nodes):
    from RegistrationFusionLib.errors import RegistrationFusionError
    from RegistrationFusionLib.logic import FusionLogic

    logic = FusionLogic(scene)
    with pytest.raises(InputDataError, match=NOT_MRI.format("Planning CT") + " an MRI, or choose CT"):
        logic.detect_capsules(nodes["ct"], "mr")
    with pytest.raises(InputDataError, match=NOT_CT.format("T2") + " a CT, or choose MR"):
        logic.detect_capsules(nodes["t2"], "ct")
    with pytest.raises(InputDataError, match=NOT_CT.format("T2")):
        logic.detect_capsules(nodes["t2"], "CT")  # the spellings the detector accepts are checked alike
    with pytest.raises(RegistrationFusionError, match="unknown modality 'pet'"):
        logic.detect_capsules(nodes["ct"], "pet")  # not a modality the check knows: refused
    assert scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 1  # only the targets


def test_planner_and_robot_calibration_refuse_an_mri_as_the_planning_ct(scene, nodes):
    from TrajectoryPlannerLib import logic

    with pytest.raises(InputDataError, match=NOT_CT.format("T2") + " the planning CT as the CT volume"):
        logic.plan(scene, nodes["t2"], nodes["targets"])
    with pytest.raises(InputDataError, match=NOT_CT.format("T2") + " the planning CT that shows the robot's"):
        logic.calibrate_robot(scene, nodes["t2"], "zframe-7tube", nodes["targets"])
    assert scene.GetNodesByClass("vtkMRMLMarkupsLineNode").GetNumberOfItems() == 0


def test_needle_check_and_maps_refuse_the_wrong_modality(scene, nodes):
    from SmartBiopsyLib import logic

    line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "Chosen path A")
    line.AddControlPoint([-10.0, -40.0, -8.0], "entry")
    line.AddControlPoint([2.0, 12.0, 3.0], "target A")
    biopsy = logic.BiopsyLogic(scene)
    with pytest.raises(InputDataError, match=NOT_CT.format("T2") + " the confirmation CT with the needle"):
        biopsy.detect_needle(nodes["t2"], line, "15G/16G-16cm")
    with pytest.raises(InputDataError, match=NOT_MRI.format("Planning CT") + " the Dixon fat image"):
        biopsy.compute_maps(water=nodes["t2"], fat=nodes["ct"])
    with pytest.raises(InputDataError, match=NOT_MRI.format("Planning CT") + " the T1 after contrast"):
        biopsy.compute_maps(pre=nodes["t2"], post=nodes["ct"])
    # the right images pass the check (the maps themselves are tested elsewhere)
    out = biopsy.compute_maps(water=nodes["fat"], fat=nodes["fat"])
    assert set(out) == {"ff"} and np.isfinite(out["ff"].GetImageData().GetScalarRange()).all()

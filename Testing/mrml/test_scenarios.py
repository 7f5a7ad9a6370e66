"""The Slicer self-test scenarios, run headless on a real MRML scene (slicer-core).

``<Module>Test.test_*`` inside Slicer calls exactly these functions with ``slicer.mrmlScene``; here each
gets a fresh scene from ``SmartBiopsyCoreLib.runtime.new_scene``. Every scenario asserts its own numbers
(registration error, habitat Dice, path clearance by an independent ray-march, robot refusals, ...);
the checks below make sure the scenarios ran and reported what they measured.
"""
from __future__ import annotations

import shutil

import pytest

from SmartBiopsyLib import scenarios as sb_scenarios
from RegistrationFusionLib import scenarios as rf_scenarios
from TrajectoryPlannerLib import scenarios as tp_scenarios
ALL = [(f"{mod.__name__.split('.')[0]}.{name}", fn)
       for mod in (rf_scenarios, sb_scenarios, tp_scenarios) for name, fn in mod.SCENARIOS.items()]


@pytest.fixture
def fresh_scene():
    from SmartBiopsyCoreLib.runtime import new_scene

    scene = new_scene()
    yield scene
    scene.Clear(True)


@pytest.mark.parametrize("name,scenario", ALL, ids=[n for n, _ in ALL])
def test_scenario_passes_on_headless_scene(name, scenario, fresh_scene):
    result = scenario(fresh_scene)
    assert isinstance(result, dict) and result, f"{name} returned no measurements"
    if "journal" in result:
        shutil.rmtree(result["journal"], ignore_errors=True)


def test_every_scenario_function_is_registered():
    """A scenario_* function that is not in SCENARIOS would be skipped by both Slicer and CI."""
    for mod in (rf_scenarios, sb_scenarios, tp_scenarios):
        defined = {n[len("scenario_"):] for n in dir(mod) if n.startswith("scenario_")}
        assert defined == set(mod.SCENARIOS), f"{mod.__name__}: unregistered {defined ^ set(mod.SCENARIOS)}"


def test_registration_scenario_fails_when_transform_is_wrong(fresh_scene, monkeypatch):
    """The scenario's own checks can fail: a registration that returns a shifted matrix is caught."""
    import numpy as np

    from RegistrationFusionLib.registration import landmarks
    real = landmarks.register_capsules

    def shifted(*args, **kwargs):
        corr, reg = real(*args, **kwargs)
        reg.matrix = reg.matrix.copy()
        reg.matrix[:3, 3] += np.array([4.0, 0.0, 0.0])
        return corr, reg

    monkeypatch.setattr(landmarks, "register_capsules", shifted)
    with pytest.raises(AssertionError):
        rf_scenarios.scenario_landmark_registration(fresh_scene)

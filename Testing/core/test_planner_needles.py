"""Needle catalogue: models, derived geometry, lookup errors."""
import json

import pytest

from TrajectoryPlannerLib.planning import needles
from TrajectoryPlannerLib.errors import TrajectoryPlannerError


def test_catalogue_has_coaxial_sets_of_the_issue():
    m15 = needles.get_needle("15G/16G-10cm")
    assert m15.introducer.gauge == 15 and m15.core.gauge == 16
    assert m15.introducer.usable_length_mm == pytest.approx(100.0)
    assert needles.get_needle("15G/16G-16cm").introducer.usable_length_mm == pytest.approx(160.0)
    for notch in (10, 20):
        m = needles.get_needle(f"17G/18G-{notch}mm")
        assert (m.introducer.gauge, m.core.gauge) == (17, 18)
        assert m.core.notch_length_mm == pytest.approx(notch)


def test_lookup_is_case_insensitive_and_unknown_names_list_the_catalogue():
    assert needles.get_needle(" 17g/18g-20MM ").name == "17G/18G-20mm"
    with pytest.raises(TrajectoryPlannerError) as e:
        needles.get_needle("14G-magic")
    for name in needles.needle_names():
        assert name in str(e.value)


def test_reach_and_overshoot_follow_the_firing_geometry():
    m = needles.get_needle("17G/18G-20mm")
    c = m.core
    assert m.tip_overshoot_mm == pytest.approx(c.notch_offset_from_tip_mm + c.notch_length_mm / 2)
    assert m.pre_fire_gap_mm == pytest.approx(c.throw_mm - m.tip_overshoot_mm)
    assert m.max_reach_mm == pytest.approx(m.introducer.usable_length_mm + m.pre_fire_gap_mm)
    assert m.outer_radius_mm == pytest.approx(m.introducer.outer_diameter_mm / 2)
    end = needles.get_needle("17G/18G-endcut-20mm")
    assert end.core.design == needles.END_CUT and end.tip_overshoot_mm == pytest.approx(10.0)


def test_models_serialise_to_json():
    d = json.loads(json.dumps(needles.get_needle("15G/16G-16cm").to_dict()))
    assert d["core"]["gauge"] == 16 and d["introducer"]["outer_diameter_mm"] > d["core"]["outer_diameter_mm"]


def test_rejects_core_needle_shorter_than_its_introducer():
    core = needles.CoreNeedle(18, 1.27, 90.0, 20.0, 5.0, 22.0)
    with pytest.raises(TrajectoryPlannerError, match="shorter than its introducer"):
        needles.NeedleModel("bad", core, needles.CoaxialIntroducer(17, 1.473, 100.0))


def test_rejects_unknown_needle_design():
    with pytest.raises(TrajectoryPlannerError, match="design"):
        needles.CoreNeedle(18, 1.27, 90.0, 20.0, 5.0, 22.0, design="spiral")

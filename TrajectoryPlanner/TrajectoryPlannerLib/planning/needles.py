"""Biopsy needle models shared by TrajectoryPlanner (reach, overshoot, needle radius) and SmartBiopsy (notch ROI).

A coaxial biopsy set is an introducer (outer cannula left in place) and a core needle fired through it.
Geometry convention used by the planner (all lengths in mm along the needle axis):

* The *target* of a trajectory is where the centre of the specimen (notch) should end up after firing.
* After firing, the core needle's tip lies ``tip_overshoot_mm`` beyond the target: for a side-notch
  needle ``notch_offset_from_tip_mm + notch_length_mm / 2``, for an end-cut needle ``notch_length_mm / 2``
  (offset is then normally 0). The planner checks clearance along the whole path up to that tip.
* Before firing, the introducer tip sits ``throw_mm - tip_overshoot_mm`` short of the target
  (``pre_fire_gap_mm``); the introducer's usable length bounds the skin-to-introducer-tip depth, so the
  longest skin-to-target distance is ``introducer usable length + pre_fire_gap_mm`` (``max_reach_mm``).
  Without an introducer the core needle's own usable length bounds the tip after firing.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from TrajectoryPlannerLib.errors import TrajectoryPlannerError

logger = logging.getLogger(__name__)

#: Nominal outer diameters (mm) of hypodermic gauges (ISO 9626 regular wall).
GAUGE_OD_MM = {13: 2.413, 14: 2.108, 15: 1.829, 16: 1.651, 17: 1.473, 18: 1.270, 19: 1.067, 20: 0.908, 21: 0.819, 22: 0.718}

SIDE_NOTCH = "side-notch"
END_CUT = "end-cut"

#: Default lateral needle placement error (mm, RMS distance of the fired needle's axis from the planned line,
#: perpendicular to it); used for the hit probability of a target and the targetable-depth margin.
DEFAULT_PLACEMENT_ERROR_LATERAL_MM = 2.0


@dataclass(frozen=True)
class CoaxialIntroducer:
    """Outer cannula of a coaxial set: gauge, outer diameter (mm), usable length (mm, hub to tip)."""

    gauge: int
    outer_diameter_mm: float
    usable_length_mm: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CoreNeedle:
    """Core (cutting) needle: notch length and offset of the notch's distal end from the tip, throw (mm)."""

    gauge: int
    outer_diameter_mm: float
    usable_length_mm: float
    notch_length_mm: float
    notch_offset_from_tip_mm: float
    throw_mm: float
    design: str = SIDE_NOTCH  # "side-notch" or "end-cut"

    def __post_init__(self):
        if self.design not in (SIDE_NOTCH, END_CUT):
            raise TrajectoryPlannerError(f"needle design '{self.design}' is unknown; use '{SIDE_NOTCH}' or '{END_CUT}'")
        if min(self.outer_diameter_mm, self.usable_length_mm, self.notch_length_mm, self.throw_mm) <= 0:
            raise TrajectoryPlannerError("core needle diameter, length, notch and throw must all be positive (mm)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NeedleModel:
    """A biopsy set: optional coaxial introducer plus core needle.

    ``placement_error_lateral_mm``: how far (RMS, mm) the placed needle's axis lies from the planned line,
    perpendicular to it (a 2-D isotropic Gaussian; per-axis SD = value / sqrt(2)).
    """

    name: str
    core: CoreNeedle
    introducer: CoaxialIntroducer | None = None
    description: str = ""
    placement_error_lateral_mm: float = DEFAULT_PLACEMENT_ERROR_LATERAL_MM

    def __post_init__(self):
        e = self.placement_error_lateral_mm
        if not isinstance(e, (int, float)) or not (0.0 <= float(e) < 50.0):
            raise TrajectoryPlannerError(
                f"needle '{self.name}': the lateral placement error must be 0-50 mm (got {e})")
        if self.introducer is not None:
            if self.introducer.outer_diameter_mm <= self.core.outer_diameter_mm:
                raise TrajectoryPlannerError(
                    f"needle '{self.name}': the introducer must be wider than the core needle it carries")
            if self.core.usable_length_mm < self.introducer.usable_length_mm:
                raise TrajectoryPlannerError(
                    f"needle '{self.name}': the core needle is shorter than its introducer and cannot leave it")

    # derived geometry --------------------------------------------------------------------------
    @property
    def tip_overshoot_mm(self) -> float:
        """Distance (mm) from the specimen centre (the target) to the fired needle tip.

        Side-notch: offset of the notch's distal end from the tip + half the notch; end-cut: the specimen
        starts at the tip (offset normally 0), so the same formula gives half the specimen length.
        """
        c = self.core
        return c.notch_offset_from_tip_mm + c.notch_length_mm / 2.0

    @property
    def pre_fire_gap_mm(self) -> float:
        """Distance (mm) from the introducer tip (before firing) to the target."""
        return max(0.0, self.core.throw_mm - self.tip_overshoot_mm)

    @property
    def max_reach_mm(self) -> float:
        """Longest skin-to-target distance (mm) this set can sample."""
        if self.introducer is None:
            return self.core.usable_length_mm - self.tip_overshoot_mm
        return min(self.introducer.usable_length_mm + self.pre_fire_gap_mm,
                   self.core.usable_length_mm - self.tip_overshoot_mm)

    @property
    def outer_radius_mm(self) -> float:
        """Radius (mm) of the widest part that passes through tissue (introducer if present)."""
        d = self.introducer.outer_diameter_mm if self.introducer is not None else self.core.outer_diameter_mm
        return d / 2.0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "introducer": None if self.introducer is None else self.introducer.to_dict(),
            "core": self.core.to_dict(),
            "tip_overshoot_mm": self.tip_overshoot_mm,
            "pre_fire_gap_mm": self.pre_fire_gap_mm,
            "max_reach_mm": self.max_reach_mm,
            "outer_radius_mm": self.outer_radius_mm,
            "placement_error_lateral_mm": float(self.placement_error_lateral_mm),
        }


def _set(name, intro_g, intro_len, core_g, core_len, notch, offset, throw, design=SIDE_NOTCH, description=""):
    intro = CoaxialIntroducer(intro_g, GAUGE_OD_MM[intro_g], intro_len)
    core = CoreNeedle(core_g, GAUGE_OD_MM[core_g], core_len, notch, offset, throw, design)
    return NeedleModel(name, core, intro, description)


#: Built-in catalogue (typical coaxial sets; check the manufacturer's sheet for the exact numbers).
CATALOGUE: dict[str, NeedleModel] = {m.name: m for m in (
    _set("15G/16G-10cm", 15, 100.0, 16, 130.0, 19.0, 5.0, 22.0,
         description="15 G coaxial introducer 10 cm, 16 G side-notch core 13 cm, 19 mm notch, 22 mm throw"),
    _set("15G/16G-16cm", 15, 160.0, 16, 190.0, 19.0, 5.0, 22.0,
         description="15 G coaxial introducer 16 cm, 16 G side-notch core 19 cm, 19 mm notch, 22 mm throw"),
    _set("17G/18G-10mm", 17, 150.0, 18, 180.0, 10.0, 5.0, 15.0,
         description="17 G coaxial introducer 15 cm, 18 G side-notch core, 10 mm notch, 15 mm throw"),
    _set("17G/18G-20mm", 17, 150.0, 18, 180.0, 20.0, 5.0, 22.0,
         description="17 G coaxial introducer 15 cm, 18 G side-notch core, 20 mm notch, 22 mm throw"),
    _set("17G/18G-endcut-20mm", 17, 150.0, 18, 180.0, 20.0, 0.0, 20.0, END_CUT,
         description="17 G coaxial introducer 15 cm, 18 G end-cut core, 20 mm specimen, 20 mm throw"),
)}

DEFAULT_NEEDLE = "15G/16G-16cm"


def needle_names() -> list[str]:
    return sorted(CATALOGUE)


def get_needle(name: str) -> NeedleModel:
    """Catalogue entry by name (case-insensitive); unknown names raise with the list of known ones."""
    if isinstance(name, NeedleModel):
        return name
    for key, model in CATALOGUE.items():
        if key.lower() == str(name).strip().lower():
            return model
    raise TrajectoryPlannerError(f"unknown needle '{name}'; choose one of: {', '.join(needle_names())}")

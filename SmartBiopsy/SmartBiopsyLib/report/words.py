"""Plain words for the report: the one table that turns the workflow's internal identifiers (planner rejection
reasons such as ``needle_length`` or ``clearance:bone``, structure names such as ``bowel_gas``, robot states)
into the words a radiologist reads. Every report table cell that shows such an identifier goes through
:func:`plain`."""

from __future__ import annotations

import re

#: identifier -> words. Planner rejection reasons (TrajectoryPlannerLib.planning.engine funnel), structure
#: names (planning risk structures and label maps) and robot target states.
PLAIN_WORDS = {
    # planner rejections (first failed constraint of a candidate path)
    "needle_length": "longer than the needle reaches",
    "angle_to_axial": "too steep to the axial plane",
    "entry_region": "entry outside the allowed skin region",
    "leaves_body": "leaves the body on the way",
    # risk structures
    "bone": "bone",
    "gas": "gas (bowel or lung)",
    "bowel_gas": "bowel gas",
    "bowel": "bowel",
    "aorta": "aorta",
    "ivc": "inferior vena cava",
    "vena_cava": "vena cava",
    "kidney": "kidney",
    "vessels": "vessels",
    "body": "body outline",
    "skin": "skin",
    # robot target states
    "pending": "not sent yet",
    "sent": "sent, no reply yet",
    "reachable": "accepted as reachable",
    "unreachable": "refused as unreachable",
    "in_position": "in position",
    "reached": "reached",
}

#: what a ``<kind>:<name>`` identifier says, with ``{}`` for the plain name
PREFIX_WORDS = {"clearance": "too close to {}"}

_SNAKE = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)+")


def plain(identifier) -> str:
    """Words for an internal identifier: ``"clearance:bowel_gas"`` -> ``"too close to bowel gas"``,
    ``"needle_length"`` -> ``"longer than the needle reaches"``; an unknown ``snake_case`` name becomes
    ``"snake case"``; anything else is returned as text unchanged."""
    text = "" if identifier is None else str(identifier).strip()
    key = text.lower()
    if key in PLAIN_WORDS:
        return PLAIN_WORDS[key]
    if ":" in key:
        kind, name = key.split(":", 1)
        if kind in PREFIX_WORDS:
            return PREFIX_WORDS[kind].format(plain(name))
        return f"{plain(kind)} {plain(name)}"
    if _SNAKE.fullmatch(key):
        return key.replace("_", " ")
    return text

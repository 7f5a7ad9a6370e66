"""One set of colours for the whole extension: figures, scene nodes, segmentations and the report.

Habitat colours come from the Okabe-Ito palette (distinguishable with the common colour-vision
deficiencies) and are used for the habitat label map, the target points, the planned paths and every figure
legend, so that habitat B is the same colour in the scene, the segmentation and the report. Colours are RGB
tuples in 0..1; :func:`hex_colour` gives the ``#rrggbb`` form for HTML and matplotlib.
"""
from __future__ import annotations

#: Okabe-Ito colours by name (RGB 0..1).
OKABE_ITO = {
    "black": (0.0, 0.0, 0.0),
    "orange": (0.902, 0.624, 0.0),
    "sky_blue": (0.337, 0.706, 0.914),
    "bluish_green": (0.0, 0.620, 0.451),
    "yellow": (0.941, 0.894, 0.259),
    "blue": (0.0, 0.447, 0.698),
    "vermillion": (0.835, 0.369, 0.0),
    "reddish_purple": (0.800, 0.475, 0.655),
}

#: Habitat label value -> colour: 1 A (low ADC, high enhancement) vermillion, 2 B (discordant) reddish
#: purple, 3 C (high ADC, low enhancement) blue.
HABITAT_COLOURS = {1: OKABE_ITO["vermillion"], 2: OKABE_ITO["reddish_purple"], 3: OKABE_ITO["blue"]}

#: Region letter -> colour (the same colours as :data:`HABITAT_COLOURS`).
REGION_COLOURS = {"A": HABITAT_COLOURS[1], "B": HABITAT_COLOURS[2], "C": HABITAT_COLOURS[3]}

#: Everything that is not a habitat: distinct from all three habitat colours.
TUMOUR_COLOUR = OKABE_ITO["yellow"]          # whole-tumour outline / segment
NEEDLE_COLOUR = OKABE_ITO["bluish_green"]     # planned or measured needle shaft
NOTCH_TIP_COLOUR = OKABE_ITO["sky_blue"]      # planned notch tip (not the target)
ENTRY_COLOUR = OKABE_ITO["orange"]            # skin entry point
NEUTRAL_COLOUR = (0.6, 0.63, 0.65)            # not assigned / candidate paths

#: Risk structures (organs at risk) in the scene's segmentation, by structure name.
RISK_COLOURS = {
    "bone": (0.92, 0.90, 0.82),
    "vessels": (0.75, 0.10, 0.10),
    "bowel": (0.85, 0.65, 0.45),
    "kidney": (0.60, 0.30, 0.20),
    "gas": (0.55, 0.80, 0.95),
}


def region_colour(region, default=NEUTRAL_COLOUR) -> tuple:
    """Colour of habitat region ``"A"``/``"B"``/``"C"`` (or label 1/2/3); ``default`` for anything else."""
    if isinstance(region, int) and not isinstance(region, bool):
        return HABITAT_COLOURS.get(region, default)
    return REGION_COLOURS.get(str(region).strip().upper()[:1] if region else "", default)


def hex_colour(rgb) -> str:
    """``(r, g, b)`` in 0..1 -> ``"#rrggbb"``."""
    return "#" + "".join(f"{int(round(max(0.0, min(1.0, float(c))) * 255)):02x}" for c in rgb[:3])

"""Needle trajectory planning: needle models (needles), risk structures and margins (risk), the planner (engine),
the skin accessibility map (skinmap) and line/model nodes in MRML (mrml)."""

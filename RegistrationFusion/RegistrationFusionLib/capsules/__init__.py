"""Skin capsule markers: detection in CT and MRI (detection) and their markups point lists in MRML (mrml)."""

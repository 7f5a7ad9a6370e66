"""Fiducial-frame models of needle-guidance robots (the robot's calibration frame as seen in CT):
schema, validation and built-in models in model; the built-in model files (JSON) beside it."""

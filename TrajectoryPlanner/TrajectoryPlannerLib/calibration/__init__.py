"""Robot-to-CT calibration from the robot's fiducial frame imaged in the planning CT: detection and model fit
with QA (frame_fit), the calibration file (calibration_file), the picture (picture) and MRML nodes (mrml)."""

"""Data in and out: images (NRRD/NIfTI), DICOM series and studies, volume nodes, scene bundles (.mrb),
and the one documented JSON schema of the MRI->CT registration transform."""

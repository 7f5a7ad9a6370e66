"""Hospital export: DICOM Segmentation, Parametric Maps and a TID 1500 Measurement Report (highdicom), FHIR R5
Specimens (fhir.resources) and the whole-case export; plus the DICOM SEG importer and the dciodvfy check."""

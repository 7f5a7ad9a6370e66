"""MRI->CT registration: capsule matching and landmark fit (landmarks), intensity refinement (refine),
QA and pictures (qa), the end-to-end fusion (pipeline) and the transform node in MRML (mrml)."""

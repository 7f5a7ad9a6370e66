"""Tumour characterisation: ADC/FF/EF maps (maps), tumour measures (tumour), habitats A/B/C (habitats),
one target per region (targets), radiomics (radiomics) and their MRML nodes (mrml)."""

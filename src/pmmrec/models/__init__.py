"""Models: modality encoders, fusion, user encoders and the PMMRec model that joins them (PMMRec §III)."""

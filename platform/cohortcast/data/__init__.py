"""Data: manifest schema, DICOM/NIfTI readers, synthetic cohort, Ray Data ingestion."""

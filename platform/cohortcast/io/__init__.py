"""Files cohortcast writes, below every other package: atomic folders and texts, the
stage markers that say an output is complete and for which inputs, the Volume (an image
with its patient-space geometry) and its NIfTI and DICOM writers. The synthetic cohort
(data), the stages (training) and forecasting (inference, serving) all write through here."""

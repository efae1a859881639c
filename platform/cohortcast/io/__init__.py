"""Files cohortcast writes, below every other package: atomic folders and texts, the
stage markers that say an output is complete and for which inputs, the Volume (an image
with its patient-space geometry), the Crop (a 2D crop with the grid it was cut on) and
the NIfTI and DICOM writers. The synthetic cohort
(data), the stages (training) and forecasting (inference, serving) all write through here."""

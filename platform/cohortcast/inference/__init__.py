"""Batch inference on Ray Data actor pools: the latent cache (every crop through the frozen
VAE) and cohort forecasting with its NIfTI/DICOM outputs. The sampler is models.sampler."""

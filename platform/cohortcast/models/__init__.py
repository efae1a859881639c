"""Pure PyTorch models (no Ray, no DeepSpeed): the nodule-aligned VAE and its losses,
the EHR-to-text prompt, the soft-prompt LLM conditioner, the temporal context encoder,
the conditional denoiser, seeded DDIM sampling and the Forecaster bundle."""

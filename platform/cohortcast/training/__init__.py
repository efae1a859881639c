"""Training on Ray Train + DeepSpeed: device/precision choice, DeepSpeed config,
per-worker loops, checkpoints, trainer builders. Models stay in cohortcast.models."""

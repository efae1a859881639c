"""Training on Ray Train + DeepSpeed: device/precision choice, DeepSpeed config,
per-worker loops (with their rank-0 MLflow logging), checkpoints, trainer builders and
the stage runner every job composes (skip/resume markers, train, export, report).
Models stay in cohortcast.models."""

"""Inference: seeded multi-sample DDIM forecasting (batch jobs and serving build on it)."""

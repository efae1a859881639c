"""Temporal context (CLDM Sec. 3): a transformer over 1..K prior exams.

Each prior exam's latent is projected to (d_model - date_dim) and concatenated with a
learnable embedding of its date, expressed as time before the target date; a [CLS]
token's output summarises the history. The target date gets its own embedding of the
forecast horizon (time from the last exam to the target). Dates enter through
learnable Fourier features: smooth in time, so unseen intervals still embed sensibly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cohortcast.config.models import TemporalConfig


class DateEmbedding(nn.Module):
    """Days -> (dim,): learnable-frequency Fourier features followed by a linear map."""

    def __init__(self, dim: int, scale_days: float, num_frequencies: int = 8):
        super().__init__()
        self.scale_days = scale_days
        init = torch.exp(torch.linspace(math.log(0.25), math.log(8.0), num_frequencies))
        self.frequencies = nn.Parameter(init)
        self.proj = nn.Linear(2 * num_frequencies + 1, dim)

    def forward(self, days: torch.Tensor) -> torch.Tensor:
        t = (days.float() / self.scale_days).unsqueeze(-1)  # (..., 1) in years
        angles = 2 * math.pi * t * self.frequencies
        return self.proj(torch.cat([t, angles.sin(), angles.cos()], dim=-1))


class TemporalContextEncoder(nn.Module):
    def __init__(self, cfg: TemporalConfig, latent_numel: int, out_dim: int):
        super().__init__()
        self.cfg = cfg
        self.latent_proj = nn.Linear(latent_numel, cfg.d_model - cfg.date_dim)
        self.exam_date = DateEmbedding(cfg.date_dim, cfg.time_scale_days)
        self.target_date = DateEmbedding(out_dim, cfg.time_scale_days)
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.num_heads, dim_feedforward=4 * cfg.d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.out = nn.Linear(cfg.d_model, out_dim)

    def forward(
        self,
        latents: torch.Tensor,
        days_before_target: torch.Tensor,
        exam_mask: torch.Tensor,
        horizon_days: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (B, K, c, h, w); days_before_target (B, K); exam_mask (B, K) True = real
        exam; horizon_days (B,). Returns ([CLS] summary (B, out_dim), target (B, out_dim))."""
        batch, k = exam_mask.shape
        if k > self.cfg.max_exams:
            raise ValueError(f"{k} prior exams exceed temporal.max_exams={self.cfg.max_exams}")
        if not exam_mask.any(dim=1).all():
            raise ValueError("every case needs at least one prior exam")
        tokens = torch.cat([self.latent_proj(latents.flatten(2)), self.exam_date(days_before_target)], dim=-1)
        tokens = torch.cat([self.cls.expand(batch, -1, -1), tokens], dim=1)  # (B, 1 + K, d_model)
        padding = torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=exam_mask.device), ~exam_mask], dim=1)
        summary = self.encoder(tokens, src_key_padding_mask=padding)[:, 0]
        return self.out(summary), self.target_date(horizon_days)

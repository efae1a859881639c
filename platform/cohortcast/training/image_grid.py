"""PNG grids for validation: one row per case, columns side by side, intensities in
the ingestion range ([-1, 1] or [0, 1]) mapped to 0..255."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    scaled = (images.detach().float().cpu().numpy() - low) / (high - low)
    return (np.clip(scaled, 0.0, 1.0) * 255).round().astype(np.uint8)


def image_grid(columns: list[torch.Tensor], gap: int = 2, low: float = -1.0) -> np.ndarray:
    """columns: tensors (B, 1, H, W) (or (B, H, W)) of the same shape -> (B*(H+gap), n*(W+gap)) uint8."""
    cols = [to_uint8(c.reshape(c.shape[0], *c.shape[-2:]), low=low) for c in columns]
    rows, h, w = cols[0].shape
    grid = np.full((rows * (h + gap) - gap, len(cols) * (w + gap) - gap), 255, np.uint8)
    for j, col in enumerate(cols):
        for i in range(rows):
            grid[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = col[i]
    return grid

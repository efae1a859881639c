"""Vision-transformer parts shared by the universal encoder and its MIM decoder:
pre-norm blocks on PyTorch's fused attention, and fixed sin-cos positions for a token
grid of any dimensionality."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention; the softmax is torch's scaled_dot_product_attention
    (flash / memory-efficient kernels where the device has them)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block (ViT / MAE): x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def axis_shares(dim: int, axes: int) -> list[int]:
    """Channels given to each axis: an even share each, the last takes the remainder
    (64 over 3 axes: 20, 20, 24; 768: 256 each)."""
    base = 2 * (dim // (2 * axes))
    return [base] * (axes - 1) + [dim - base * (axes - 1)]


def sincos_1d(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """(M,) positions -> (M, channels): sin and cos at geometric frequencies 1 .. 1/10000."""
    half = channels // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_position_embedding(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed positions for a (g0, g1[, g2]) token grid, row-major like the patch tokens:
    (prod(grid), dim) float32, one block of channels per axis (MAE's 2D recipe, extended
    to 3D)."""
    coords = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    parts = [sincos_1d(c.reshape(-1), share) for c, share in zip(coords, axis_shares(dim, len(grid)))]
    return torch.cat(parts, dim=1).float()

"""The CLDM denoiser over study tokens: a DiT-style transformer (Peebles & Xie 2023) with
cross-attention to the longitudinal context, in place of the paper's U-Net (a study
latent here is a token sequence, not a feature map).

- Input: the noisy target tokens (B, 1 + N, dim) concatenated feature-wise with the last
  prior's tokens (the baseline, as NAMD concatenates its baseline latent channel-wise).
  Neighbouring patch tokens are grouped (`group_2d` / `group_3d`, DiT's patch size on the
  latent grid) and linearly projected to `width`: 512 CT tokens become 64 positions, so
  attention costs 64x less while every token is still diffused exactly (the output is
  ungrouped by a linear head). [CLS] is one more position with its own projections.
  One projection pair per study kind (2D / 3D): group volumes differ; the blocks are
  shared, so one set of weights serves radiographs and CT as the paper's shared U-Net.
- Positions: fixed sin-cos over the grouped grid (parameter-free), a learned one for [CLS].
- Timestep: sinusoidal embedding (the paper's) -> MLP -> adaLN-Zero (DiT): every block's
  LayerNorms are scaled/shifted, and its residual branches gated, by the timestep, the
  gates and the output head starting at zero (each block starts as the identity).
- Context: cross-attention in every block (PixArt-alpha's layout: self-attention,
  cross-attention, MLP) to [temporal [CLS] summary s_n, target-date embedding(, the last
  prior's mean patch token)], each slot with a learned null token for classifier-free
  guidance; the cross-attention output projection starts at zero as in PixArt-alpha.

`forward(noisy, t, baseline, context)` and `null(B)` are what models/sampler.py calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from cohortcast.config.cldm_models import TokenDenoiserConfig, TokenLatentConfig

TIMESTEP_FREQUENCIES = 256  # DiT's sinusoidal width before the MLP


def group_tokens(tokens: torch.Tensor, grid: tuple[int, ...], group: tuple[int, ...]) -> torch.Tensor:
    """(B, N, F) row-major over `grid` -> (B, N / prod(group), prod(group) * F): each output
    position holds one `group`-sized block of neighbours, row-major over the coarse grid."""
    b, _, f = tokens.shape
    n = len(grid)
    coarse = [g // k for g, k in zip(grid, group)]
    split = [s for pair in zip(coarse, group) for s in pair]  # (c0, k0, c1, k1, ...)
    x = tokens.reshape(b, *split, f)
    order = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [2 * n + 1]
    return x.permute(*order).reshape(b, math.prod(coarse), math.prod(group) * f)


def ungroup_tokens(grouped: torch.Tensor, grid: tuple[int, ...], group: tuple[int, ...]) -> torch.Tensor:
    """Inverse of group_tokens: (B, N / prod(group), prod(group) * F) -> (B, N, F)."""
    b = grouped.shape[0]
    n = len(grid)
    coarse = [g // k for g, k in zip(grid, group)]
    f = grouped.shape[-1] // math.prod(group)
    x = grouped.reshape(b, *coarse, *group, f)
    order = [0] + [p for i in range(n) for p in (1 + i, 1 + n + i)] + [2 * n + 1]
    return x.permute(*order).reshape(b, math.prod(grid), f)


def grid_sincos(grid: tuple[int, ...], width: int) -> torch.Tensor:
    """(prod(grid), width) fixed sin-cos positions: an equal even share of the width per
    axis (MAE/DiT's 2D recipe, extended to 3D), the remainder zero."""
    share = 2 * (width // (2 * len(grid)))
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    half = share // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1))
    parts = []
    for axis in coords:
        angles = axis.reshape(-1, 1) * omega
        parts += [angles.sin(), angles.cos()]
    pos = torch.cat(parts, dim=1)
    return F.pad(pos, (0, width - pos.shape[1])).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention; self-attention without `context`, cross-attention with it."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, w = x.shape
        source = x if context is None else context
        m = source.shape[1]
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(source).view(b, m, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention and MLP (DiT), cross-attention to the context between them."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm_cross = nn.LayerNorm(width, eps=1e-6)
        self.cross = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross(self.norm_cross(x), context)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCIES, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = get_timestep_embedding(t, TIMESTEP_FREQUENCIES, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class TokenDenoiser(nn.Module):
    def __init__(self, latent: TokenLatentConfig, cfg: TokenDenoiserConfig):
        super().__init__()
        self.latent, self.cfg = latent, cfg
        w, d = cfg.width, latent.dim
        self.cls_in = nn.Linear(2 * d, w)
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, w))
        self.cls_out = nn.Linear(w, d)
        self.patch_in = nn.ModuleDict()
        self.patch_out = nn.ModuleDict()
        for dims in latent.dims:
            group = math.prod(cfg.group(dims))
            self.patch_in[f"{dims}d"] = nn.Linear(group * 2 * d, w)
            self.patch_out[f"{dims}d"] = nn.Linear(w, group * d)
            coarse = tuple(g // k for g, k in zip(latent.grid(dims), cfg.group(dims)))
            self.register_buffer(f"pos_{dims}d", grid_sincos(coarse, w), persistent=False)
        self.t_embed = TimestepEmbedder(w)
        self.blocks = nn.ModuleList(DiTBlock(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.context_slots = 2 + int(cfg.prior_in_context)
        self.prior_proj = nn.Linear(d, w) if cfg.prior_in_context else None
        self.null_context = nn.Parameter(torch.randn(self.context_slots, w) * 0.02)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's: xavier-uniform linears with zero biases, N(0, 0.02) timestep MLP, zero
        adaLN modulations and output heads; zero cross-attention outputs (PixArt-alpha)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        zero = [self.final_ada[-1], self.cls_out, *self.patch_out.values()]
        zero += [m for block in self.blocks for m in (block.ada[-1], block.cross.proj)]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # -- context --------------------------------------------------------------------------

    def null(self, batch: int) -> torch.Tensor:
        return self.null_context.unsqueeze(0).expand(batch, -1, -1)

    def build_context(
        self,
        summary: torch.Tensor,
        target_date: torch.Tensor,
        last_prior: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, S, width): [temporal summary, target-date embedding(, the last prior's mean
        patch token, projected)]; rows where `drop` is True get the null tokens."""
        slots = [summary, target_date]
        if self.prior_proj is not None:
            if last_prior is None:
                raise ValueError("denoiser.prior_in_context is on: the last prior's tokens are needed")
            slots.append(self.prior_proj(last_prior[:, 1:].mean(dim=1)))
        context = torch.stack(slots, dim=1)
        if drop is not None:
            context = torch.where(drop.view(-1, 1, 1), self.null(context.shape[0]), context)
        return context

    # -- network --------------------------------------------------------------------------

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, baseline: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """noisy, baseline (B, 1 + N, dim); timesteps (B,) or a scalar; context (B, S, width)
        -> the network's prediction (B, 1 + N, dim) (epsilon, v or x0 per the scheduler)."""
        b, n1, _ = noisy.shape
        if baseline.shape != noisy.shape:
            raise ValueError(f"baseline {tuple(baseline.shape)} and noisy {tuple(noisy.shape)} differ in shape")
        dims = self.latent.dims_of(n1 - 1)
        grid, group = self.latent.grid(dims), self.cfg.group(dims)
        x = torch.cat([noisy, baseline], dim=-1)
        cls = self.cls_in(x[:, :1]) + self.cls_pos
        patches = self.patch_in[f"{dims}d"](group_tokens(x[:, 1:], grid, group)) + getattr(self, f"pos_{dims}d")
        h = torch.cat([cls, patches], dim=1)
        t = torch.as_tensor(timesteps, device=noisy.device)
        c = self.t_embed(t.expand(b) if t.dim() == 0 else t)
        for block in self.blocks:
            h = block(h, c, context)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        h = modulate(self.final_norm(h), shift, scale)
        out_patches = ungroup_tokens(self.patch_out[f"{dims}d"](h[:, 1:]), grid, group)
        return torch.cat([self.cls_out(h[:, :1]), out_patches], dim=1)

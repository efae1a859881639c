"""Switchable patch embeddings (UniMiSS): a 2D one for radiographs and a 3D one for CT
volumes, both producing tokens of the same width for one shared transformer; and the
patchify / unpatchify pair that turns an image into the MIM targets and back, in the
same token order as the embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from cohortcast.models.errors import EncoderInputError


class PatchEmbedding(nn.Module):
    """Non-overlapping patches -> `dim`-wide tokens: a strided Conv2d (2 patch sizes) or
    Conv3d (3), tokens row-major over the patch grid."""

    def __init__(self, patch: tuple[int, ...], dim: int, in_channels: int = 1):
        super().__init__()
        self.patch = tuple(patch)
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[len(self.patch)]
        self.proj = conv(in_channels, dim, kernel_size=self.patch, stride=self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, N, dim)."""
        return self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


def patch_grid(spatial: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s // p for s, p in zip(spatial, patch))


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *spatial) -> (B, N, prod(patch) * C), patches in the embeddings' token order,
    each patch's pixels row-major."""
    b, c, *spatial = x.shape
    grid = patch_grid(tuple(spatial), patch)
    n = len(patch)
    split = [b, c] + [v for g, p in zip(grid, patch) for v in (g, p)]
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., p0, p1, ..., C)
    order = [0] + [2 + 2 * i for i in range(n)] + [3 + 2 * i for i in range(n)] + [1]
    return x.reshape(split).permute(order).reshape(b, math.prod(grid), math.prod(patch) * c)


def unpatchify(patches: torch.Tensor, patch: tuple[int, ...], grid: tuple[int, ...], channels: int = 1) -> torch.Tensor:
    """Inverse of patchify: (B, N, prod(patch) * C) -> (B, C, *spatial)."""
    b, n = patches.shape[0], len(patch)
    x = patches.reshape(b, *grid, *patch, channels)
    # (B, g0, g1, ..., p0, p1, ..., C) -> (B, C, g0, p0, g1, p1, ...)
    order = [0, 1 + 2 * n] + [v for i in range(n) for v in (1 + i, 1 + n + i)]
    return x.permute(order).reshape(b, channels, *(g * p for g, p in zip(grid, patch)))


def check_input(x: torch.Tensor, patch_2d: tuple[int, ...], patch_3d: tuple[int, ...], example_2d, example_3d) -> int:
    """The input's dimensionality (2 or 3), or an EncoderInputError naming the shapes the
    encoder takes and what is wrong with this one."""
    expected = (
        f"expected (B, 1, H, W) for a 2D image (H, W multiples of the patch {tuple(patch_2d)}, "
        f"e.g. (B, 1, {', '.join(map(str, example_2d))})) or (B, 1, D, H, W) for a volume (multiples of "
        f"{tuple(patch_3d)}, e.g. (B, 1, {', '.join(map(str, example_3d))}))"
    )
    shape = tuple(getattr(x, "shape", ()))
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        raise EncoderInputError(f"universal encoder: {expected}; got shape {shape} (rank {len(shape)})")
    if shape[1] != 1:
        raise EncoderInputError(f"universal encoder: {expected}; got {shape[1]} channels in shape {shape}")
    dims = x.ndim - 2
    patch = patch_2d if dims == 2 else patch_3d
    names = ("H", "W") if dims == 2 else ("D", "H", "W")
    bad = [f"{name} = {s} is not a multiple of {p}" for name, s, p in zip(names, shape[2:], patch) if s % p or s < p]
    if bad:
        raise EncoderInputError(f"universal encoder: {expected}; got shape {shape}: {', '.join(bad)}")
    if math.prod(patch_grid(shape[2:], tuple(patch))) < 2:
        raise EncoderInputError(f"universal encoder: {expected}; got shape {shape}: fewer than 2 patches")
    return dims

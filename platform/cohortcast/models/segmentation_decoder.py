"""Segmentation decoder (CLDM Sec. 3): a study's tokens -> ILD mask logits on its grid.

The paper uses "the lightweight UniMiSS decoder that mirrors the encoder's resolution
hierarchy, using transposed convolutions". Our encoder is a plain ViT (one token grid,
no pyramid to skip-connect from), so the decoder rebuilds the hierarchy from the tokens:
the patch tokens (plus a projection of [CLS], the study-level context) are laid out on
the token grid as a feature volume, then upsampled by transposed convolutions, one stage
per factor 2 of the patch size (config.cldm_models.upsample_strides: 4 x 8 x 8 patches
-> strides 2,2,2 / 2,2,2 / 1,2,2), each stage a stride-sized transposed conv, a 3x3x3
conv, GroupNorm and GELU; a 1x1x1 conv gives one logit per voxel. The loss is MONAI's
DiceCELoss on the logits (sigmoid Dice + binary cross-entropy for one channel).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from torch import nn

from cohortcast.config import from_dict
from cohortcast.config.cldm_models import CLDMModelsConfig, upsample_strides
from cohortcast.models.cldm_io import check_config, load_weights, read_model_meta, save_model_folder


def _stage(dims: int, c_in: int, c_out: int, stride: tuple[int, ...]) -> nn.Sequential:
    up = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    return nn.Sequential(
        up(c_in, c_out, kernel_size=stride, stride=stride),
        conv(c_out, c_out, kernel_size=3, padding=1),
        nn.GroupNorm(math.gcd(8, c_out), c_out),
        nn.GELU(),
    )


class SegmentationDecoder(nn.Module):
    KIND = "segmentation_decoder"

    def __init__(self, cfg: CLDMModelsConfig, dims: int = 3):
        super().__init__()
        cfg.validate()
        self.cfg, self.dims = cfg, dims
        lat, seg = cfg.latent, cfg.segmentation
        self.grid = lat.grid(dims)
        strides = upsample_strides(lat.patch(dims))
        if len(seg.channels) != len(strides):
            raise ValueError(f"segmentation.channels needs {len(strides)} widths for patch {lat.patch(dims)}")
        self.cls_proj = nn.Linear(lat.dim, lat.dim)
        self.norm = nn.LayerNorm(lat.dim)
        widths = [lat.dim, *seg.channels]
        self.stages = nn.Sequential(*[_stage(dims, widths[i], widths[i + 1], s) for i, s in enumerate(strides)])
        self.head = (nn.Conv3d if dims == 3 else nn.Conv2d)(widths[-1], 1, kernel_size=1)
        self.criterion = DiceCELoss(sigmoid=True, lambda_dice=seg.dice_weight, lambda_ce=seg.ce_weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1 + N, dim) -> logits (B, 1, *study grid), e.g. (B, 1, D, H, W)."""
        n = math.prod(self.grid)
        if tokens.dim() != 3 or tokens.shape[1] != 1 + n:
            raise ValueError(f"tokens must be (B, 1 + {n}, dim) for the grid {self.grid}, got {tuple(tokens.shape)}")
        x = self.norm(tokens[:, 1:] + self.cls_proj(tokens[:, :1]))
        x = x.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)
        return self.head(self.stages(x))

    def loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Dice + BCE; mask (B, 1, *grid) or (B, *grid), 0/1."""
        target = mask if mask.dim() == logits.dim() else mask.unsqueeze(1)
        return self.criterion(logits, target.to(logits.dtype))

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """(B, *grid) uint8 mask: sigmoid(logit) > threshold."""
        return (torch.sigmoid(self(tokens)[:, 0]) > threshold).to(torch.uint8)

    # ----- persistence -----------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        save_model_folder(folder, self.KIND, self.cfg, self, extra={"dims": self.dims})

    @classmethod
    def load(
        cls, folder: str | Path, expected: CLDMModelsConfig | None = None, map_location: str = "cpu"
    ) -> SegmentationDecoder:
        """Rebuild from `folder`; with `expected`, refuse other token or decoder sizes."""
        meta = read_model_meta(folder, cls.KIND)
        dims = int(meta["dims"])
        if expected is not None:
            fields = ("latent.dim", f"latent.grid_{dims}d", f"latent.patch_{dims}d", "segmentation.channels")
            check_config(folder, meta["config"], expected, fields=fields)
        model = cls(from_dict(CLDMModelsConfig, meta["config"]), dims=dims)
        load_weights(folder, cls.KIND, model, map_location)
        return model.eval()

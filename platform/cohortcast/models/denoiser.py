"""Conditional denoiser: diffusers UNet2DConditionModel with the baseline latent
channel-concatenated to the noisy latent, cross-attending to three context tokens
[EHR, temporal summary, target date].

Each context slot has a learned null token. Training drops the whole context to the
nulls with probability `condition_dropout` (classifier-free guidance); the
unconditional pre-training stage uses the nulls throughout and a zero baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from cohortcast.config.models import DenoiserConfig
from cohortcast.models.local_weights import local_model_folder

CONTEXT_SLOTS = ("ehr", "temporal", "target_date")


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int) -> UNet2DConditionModel:
    """Extra input channels with zero weights (InstructPix2Pix-style): same function at init."""
    old = unet.conv_in
    if in_channels == old.in_channels:
        return unet
    if in_channels < old.in_channels:
        raise ValueError(f"cannot narrow conv_in from {old.in_channels} to {in_channels} channels")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def load_pretrained_unet(path: str | Path, latent_channels: int) -> UNet2DConditionModel:
    path = local_model_folder(path, "model.denoiser.pretrained_path")
    unet = UNet2DConditionModel.from_pretrained(str(path), local_files_only=True)
    if unet.config.out_channels != latent_channels:
        raise ValueError(
            f"{path}: U-Net predicts {unet.config.out_channels} channels, VAE latents have {latent_channels}"
        )
    return widen_conv_in(unet, 2 * latent_channels)


def build_unet(cfg: DenoiserConfig, latent_channels: int, sample_size: int) -> UNet2DConditionModel:
    if cfg.pretrained_path:
        return load_pretrained_unet(cfg.pretrained_path, latent_channels)
    levels = len(cfg.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=2 * latent_channels,
        out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cfg.cross_attention_dim,
    )
    # The baseline half of conv_in starts at zero, as for a widened pretrained U-Net:
    # unconditional pre-training feeds a zero baseline, so these weights get no gradient
    # there and would otherwise reach the conditional stage as random noise.
    with torch.no_grad():
        unet.conv_in.weight[:, latent_channels:].zero_()
    return unet


def condition_dropout_mask(batch: int, p: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(B,) bool: which rows train on the null context this step (classifier-free guidance)."""
    return torch.rand(batch, generator=generator, device=device) < p


class ConditionalDenoiser(nn.Module):
    def __init__(self, cfg: DenoiserConfig, latent_channels: int, sample_size: int, ehr_dim: int | None):
        super().__init__()
        self.cfg = cfg
        self.unet = build_unet(cfg, latent_channels, sample_size)
        d = cfg.cross_attention_dim
        self.ehr_proj = nn.Linear(ehr_dim, d) if ehr_dim else None
        self.null_context = nn.Parameter(torch.randn(len(CONTEXT_SLOTS), d) * 0.02)

    def null(self, batch: int) -> torch.Tensor:
        return self.null_context.unsqueeze(0).expand(batch, -1, -1)

    def build_context(
        self, ehr: torch.Tensor | None, temporal: torch.Tensor, target: torch.Tensor, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 3, D) context; rows where `drop` is True (and the EHR slot when there is no
        EHR embedding) get the null tokens."""
        batch = temporal.shape[0]
        null = self.null(batch)
        ehr_token = self.ehr_proj(ehr) if (ehr is not None and self.ehr_proj is not None) else null[:, 0]
        context = torch.stack([ehr_token, temporal, target], dim=1)
        if drop is not None:
            context = torch.where(drop.view(-1, 1, 1), null, context)
        return context

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, baseline: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """noisy, baseline (B, c, h, w); timesteps (B,) or scalar; context (B, T, D) -> eps."""
        return self.unet(torch.cat([noisy, baseline], dim=1), timesteps, encoder_hidden_states=context).sample

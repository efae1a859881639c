"""NAMD Eq. 6: L1 reconstruction + KL to N(0, I) + perceptual + alignment + probe BCE,
each weighted from VAELossConfig. Returns every term so training can log them."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from cohortcast.config.models import VAELossConfig
from cohortcast.models.alignment import alignment_loss
from cohortcast.models.perceptual import LPIPS
from cohortcast.models.vae import VAEOutput

log = logging.getLogger(__name__)


def build_perceptual(cfg: VAELossConfig) -> LPIPS | None:
    """LPIPS from local weights, or None (term off) with a log line saying so."""
    if cfg.perceptual == 0:
        return None
    if not (cfg.perceptual_vgg_path and cfg.perceptual_lpips_path):
        log.warning(
            "perceptual loss is off: vae.loss.perceptual_vgg_path / perceptual_lpips_path not set "
            "(no model hub here; point them at local VGG16 and LPIPS weight files)"
        )
        return None
    return LPIPS.from_files(cfg.perceptual_vgg_path, cfg.perceptual_lpips_path)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over elements of KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def vae_loss(
    out: VAEOutput,
    images: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: VAELossConfig,
    perceptual: LPIPS | None = None,
) -> dict[str, torch.Tensor]:
    """`labels`: (B,) in {0, 1}, or -1 for unlabelled rows (excluded from the probe)."""
    terms = {
        "reconstruction": F.l1_loss(out.reconstruction, images),
        "kl": kl_to_standard_normal(out.mean, out.logvar),
        "alignment": alignment_loss(features, out.mean, cfg.tau_f, cfg.tau_z),
    }
    zero = images.new_zeros(())
    terms["perceptual"] = perceptual(out.reconstruction, images).mean() if perceptual is not None else zero
    if labels is not None and (labels >= 0).any():
        known = labels >= 0
        terms["probe"] = F.binary_cross_entropy_with_logits(out.probe_logit[known], labels[known].float())
    else:
        terms["probe"] = zero
    terms["total"] = sum(getattr(cfg, name) * value for name, value in terms.items())
    return terms

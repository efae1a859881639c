"""The downstream malignancy evaluator of NAMD Sec. 4.1.2: a standard transformers ViT
(`ViTForImageClassification`, one logit) on single-channel nodule crops. It is a neutral
judge of real and generated follow-ups, not a tuned diagnostic model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cohortcast.config.evaluation import EvaluatorConfig


class MalignancyEvaluator(nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit  # transformers ViTForImageClassification, num_labels=1

    @classmethod
    def build(cls, cfg: EvaluatorConfig, image_size: int) -> MalignancyEvaluator:
        from transformers import ViTConfig, ViTForImageClassification

        if cfg.pretrained_path:
            from cohortcast.models.local_weights import local_model_folder

            folder = local_model_folder(cfg.pretrained_path, "evaluation.evaluator.pretrained_path")
            # A new one-logit head; the trunk keeps its weights (and its channel count:
            # grey crops are repeated to 3 channels in `_pixels`).
            vit = ViTForImageClassification.from_pretrained(folder, num_labels=1, ignore_mismatched_sizes=True)
            return cls(vit)
        config = ViTConfig(
            image_size=image_size,
            patch_size=cfg.patch_size,
            num_channels=1,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            num_labels=1,
        )
        return cls(ViTForImageClassification(config))

    @property
    def image_size(self) -> int:
        return int(self.vit.config.image_size)

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) crops in the ingest's [-1, 1] scale (the ViT processors' own
        normalisation) -> the channel count the trunk expects."""
        if images.ndim == 3:
            images = images[:, None]
        channels = self.vit.config.num_channels
        return images.expand(-1, channels, -1, -1) if channels != images.shape[1] else images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B,) malignancy logits."""
        pixels = self._pixels(images)
        return self.vit(pixel_values=pixels, interpolate_pos_encoding=pixels.shape[-1] != self.image_size).logits[:, 0]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, hidden): the final-layernorm [CLS] token the head reads,
        the feature space of the Frechet distance when no Inception weights are given."""
        pixels = self._pixels(images)
        out = self.vit.vit(pixel_values=pixels, interpolate_pos_encoding=pixels.shape[-1] != self.image_size)
        return out.last_hidden_state[:, 0]

    def save(self, folder: str | Path) -> None:
        from cohortcast.io.atomic import atomic_folder

        with atomic_folder(Path(folder), overwrite=True) as tmp:
            self.vit.save_pretrained(tmp)

    @classmethod
    def load(cls, folder: str | Path) -> MalignancyEvaluator:
        from transformers import ViTForImageClassification

        return cls(ViTForImageClassification.from_pretrained(Path(folder))).eval()

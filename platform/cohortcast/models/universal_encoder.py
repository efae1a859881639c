"""Universal 2D/3D encoder (CLDM Sec. 3, after UniMiSS): one vision transformer for chest
radiographs and CT volumes.

- Switchable patch embeddings: a 2D one turns (B, 1, H, W) into tokens, a 3D one turns
  (B, 1, D, H, W) into tokens of the same width; from there on both go through the SAME
  transformer blocks, so what is learnt on radiographs serves CT and back (UniMiSS's
  "breaking the dimensionality barrier"). Each embedding's bias doubles as a learnt
  per-dimensionality offset, so the blocks can tell the two apart.
- Positions: fixed sin-cos per dimensionality, over (h, w) for images and (d, h, w) for
  volumes. Chosen over learnt tables because they have no parameters: the weights do not
  depend on the input size, so one set of weights encodes whatever grid ingestion
  produces (any multiple of the patch) and pretrained weights stay loadable when the
  volume shape changes, where a learnt table would need resampling and would make
  `pretrained_path` refuse the shapes; MAE found sin-cos as good as learnt for MIM.
- A learnt [CLS] token (no position) goes first; its output is the study embedding z_d.
- Pre-training: masked-image modelling as MAE (He et al. 2022): a random `mask_ratio` of
  each sample's patches is dropped (a torch.Generator makes it reproducible), the encoder
  sees only the visible ones, a light decoder (shared by 2D and 3D, one prediction head
  per dimensionality since the patches differ in size) fills in mask tokens and predicts
  every patch's pixels; the loss is the mean squared error on the masked patches, against
  targets normalised per patch (`norm_pix_loss`).

`forward(x)` is the MIM loss, so DDP / DeepSpeed engines that call the module train it;
features come from `tokens` / `embed`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from cohortcast.config.cldm import EncoderConfig
from cohortcast.models.encoder_weights import load_pretrained, read_config, save_encoder
from cohortcast.models.patch_embed import PatchEmbedding, check_input, patch_grid, patchify, unpatchify
from cohortcast.models.vit import Block, sincos_position_embedding

__all__ = ["UniversalEncoder", "load_pretrained", "random_patch_mask"]

NORM_PIX_EPS = 1e-6


def random_patch_mask(
    batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking. Returns (ids_keep (B, K) the visible patches,
    mask (B, N) 1.0 where masked, ids_restore (B, N) the unshuffling permutation).
    The noise is drawn on the generator's own device (then moved), so a CPU generator
    gives the same mask whatever device the model is on. At least one patch stays
    visible and one is masked."""
    keep = min(max(int(num_patches * (1 - mask_ratio)), 1), num_patches - 1)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=noise_device).to(device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], mask.gather(1, ids_restore), ids_restore


def _take(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, C) at ids (B, K) -> (B, K, C)."""
    return tokens.gather(1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


class UniversalEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed_2d = PatchEmbedding(tuple(cfg.patch_2d), cfg.dim)
        self.patch_embed_3d = PatchEmbedding(tuple(cfg.patch_3d), cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        # MIM decoder: pre-training only (the latent cache never runs it).
        self.decoder_embed = nn.Linear(cfg.dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.decoder_pred_2d = nn.Linear(cfg.decoder_dim, math.prod(cfg.patch_2d))
        self.decoder_pred_3d = nn.Linear(cfg.decoder_dim, math.prod(cfg.patch_3d))
        self._positions: dict[tuple, torch.Tensor] = {}  # (grid, width, device, dtype) -> (N, width)
        self._init_weights()
        if cfg.pretrained_path:
            load_pretrained(self, cfg.pretrained_path)

    def _init_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears and patch projections (as if
        linear), zero biases, N(0, 0.02) tokens."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for embedding in (self.patch_embed_2d, self.patch_embed_3d):
            weight = embedding.proj.weight
            nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
            nn.init.zeros_(embedding.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- shapes ---------------------------------------------------------------------------

    def _dims(self, x: torch.Tensor) -> int:
        c = self.cfg
        return check_input(x, c.patch_2d, c.patch_3d, c.image_2d, c.volume_3d)

    def _patch(self, dims: int) -> tuple[int, ...]:
        return tuple(self.cfg.patch_2d if dims == 2 else self.cfg.patch_3d)

    def _position(self, grid: tuple[int, ...], width: int, like: torch.Tensor) -> torch.Tensor:
        key = (grid, width, like.device, like.dtype)
        if key not in self._positions:
            self._positions[key] = sincos_position_embedding(grid, width).to(like.device, like.dtype)
        return self._positions[key]

    # -- encoder --------------------------------------------------------------------------

    def _patch_tokens(self, x: torch.Tensor, dims: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(B, N, dim) patch tokens with their positions, and the patch grid."""
        embedding = self.patch_embed_2d if dims == 2 else self.patch_embed_3d
        tokens = embedding(x)
        grid = patch_grid(tuple(x.shape[2:]), self._patch(dims))
        return tokens + self._position(grid, self.cfg.dim, tokens), grid

    def _encode(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(patch_tokens.shape[0], -1, -1).to(patch_tokens.dtype)
        x = torch.cat([cls, patch_tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H, W) through the 2D patch embedding, or (B, 1, D, H, W) through the 3D
        one; the shared transformer; returns (B, 1 + N, dim), [CLS] first, then the
        patches row-major over the patch grid."""
        dims = self._dims(x)
        return self._encode(self._patch_tokens(x, dims)[0])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim): the [CLS] token, the study embedding z_d."""
        return self.tokens(x)[:, 0]

    # -- masked-image modelling -----------------------------------------------------------

    def _predict(self, x: torch.Tensor, generator: torch.Generator | None):
        """MAE forward: (pred (B, N, P) float32, target (B, N, P) pixels, mask (B, N), dims)."""
        dims = self._dims(x)
        tokens, grid = self._patch_tokens(x, dims)
        b, n, _ = tokens.shape
        ids_keep, mask, ids_restore = random_patch_mask(b, n, self.cfg.mask_ratio, generator, x.device)
        latent = self._encode(_take(tokens, ids_keep))
        dec = self.decoder_embed(latent)
        filled = torch.cat([dec[:, 1:], self.mask_token.to(dec.dtype).expand(b, n - ids_keep.shape[1], -1)], dim=1)
        filled = _take(filled, ids_restore) + self._position(grid, self.cfg.decoder_dim, dec)
        h = torch.cat([dec[:, :1], filled], dim=1)
        for block in self.decoder_blocks:
            h = block(h)
        head = self.decoder_pred_2d if dims == 2 else self.decoder_pred_3d
        pred = head(self.decoder_norm(h))[:, 1:].float()
        return pred, patchify(x.float(), self._patch(dims)), mask, dims

    @staticmethod
    def _normalised(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-patch (target - mean) / sqrt(var + 1e-6), with the mean and std: MAE's
        norm_pix_loss exactly (unbiased variance; a flat patch's target is 0). A one-pixel
        patch has no unbiased variance, so it takes the population one (0)."""
        mean = target.mean(dim=-1, keepdim=True)
        correction = 1 if target.shape[-1] > 1 else 0
        std = (target.var(dim=-1, keepdim=True, correction=correction) + NORM_PIX_EPS).sqrt()
        return (target - mean) / std, mean, std

    def mim_loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Masked-image modelling loss on a 2D or a 3D batch: mean squared error between
        the predicted and the (per-patch normalised) pixels of the masked patches.
        Scalar float32 tensor."""
        pred, target, mask, _ = self._predict(x, generator)
        if self.cfg.norm_pix_loss:
            target = self._normalised(target)[0]
        per_patch = (pred - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    forward = mim_loss

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction), both shaped like x, for PNG grids: the input with
        its masked patches zeroed, and the input with its masked patches replaced by the
        prediction (with norm_pix_loss de-normalised by each patch's own mean and std, as
        MAE's figures do: the grid shows structure, not the patch's brightness)."""
        pred, target, mask, dims = self._predict(x, generator)
        if self.cfg.norm_pix_loss:
            _, mean, std = self._normalised(target)
            pred = pred * std + mean
        masked = mask[..., None].bool()
        grid = patch_grid(tuple(x.shape[2:]), self._patch(dims))
        hidden = unpatchify(target.masked_fill(masked, 0.0), self._patch(dims), grid)
        filled = unpatchify(torch.where(masked, pred, target), self._patch(dims), grid)
        return hidden.to(x.dtype), filled.to(x.dtype)

    # -- weights --------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """config.json + weights.safetensors, atomically."""
        save_encoder(self, self.cfg, folder)

    @classmethod
    def load(cls, folder: str | Path) -> UniversalEncoder:
        """The encoder a save() wrote, in eval mode; the weights must fit its config exactly."""
        model = cls(read_config(folder))
        load_pretrained(model, folder)
        return model.eval()

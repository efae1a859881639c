"""Nodule-aligned VAE: a diffusers AutoencoderKL plus the linear malignancy probe
(NAMD Eq. 5) on its latent.

CT crops have one channel; SD1.5's VAE expects three. Rather than repeating the
channel at every call, the 3-channel weights are folded once, exactly: feeding a
grey image repeated to RGB equals feeding the grey image to a conv_in whose weights
are summed over the RGB inputs, and averaging the decoded RGB equals a conv_out with
averaged weights and bias. So the folded 1-channel model computes the same function
as "repeat in, average out" on the pretrained one (tested).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from cohortcast.config.models import VAEConfig
from cohortcast.errors import MissingInputError
from cohortcast.models.local_weights import local_model_folder

log = logging.getLogger(__name__)


def build_autoencoder(cfg: VAEConfig) -> AutoencoderKL:
    levels = len(cfg.block_out_channels)
    model = AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        scaling_factor=cfg.scaling_factor or 1.0,
    )
    if cfg.posterior_logvar_init is not None:
        init_posterior_logvar(model, cfg.posterior_logvar_init)
    return model


def init_posterior_logvar(model: AutoencoderKL, value: float) -> None:
    """Start the posterior log-variance near `value` (see VAEConfig.posterior_logvar_init).
    The moments leave the encoder through quant_conv (or encoder.conv_out without it),
    mean channels first, log-variance second; only the log-variance half is changed."""
    conv = model.quant_conv if model.quant_conv is not None else model.encoder.conv_out
    c = model.config.latent_channels
    with torch.no_grad():
        conv.weight[c:].mul_(0.1)  # keep the input's influence small next to the bias
        conv.bias[c:].fill_(value)


def fold_rgb_to_grey(rgb: AutoencoderKL) -> AutoencoderKL:
    """3-channel AutoencoderKL -> 1-channel one computing repeat-in / average-out."""
    config = dict(rgb.config)
    if config["in_channels"] != 3 or config["out_channels"] != 3:
        raise ValueError(f"expected a 3-channel VAE, got in={config['in_channels']} out={config['out_channels']}")
    config.update(in_channels=1, out_channels=1)
    grey = AutoencoderKL.from_config(config)
    state = rgb.state_dict()
    state["encoder.conv_in.weight"] = state["encoder.conv_in.weight"].sum(dim=1, keepdim=True)
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"].mean(dim=0, keepdim=True)
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"].mean(dim=0, keepdim=True)
    grey.load_state_dict(state)
    return grey


def load_pretrained_autoencoder(path: str | Path, in_channels: int) -> AutoencoderKL:
    """A local diffusers-format VAE folder (config.json + weights), e.g. SD1.5's `vae/`."""
    path = local_model_folder(path, "model.vae.pretrained_path")
    model = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    if model.config.in_channels == in_channels:
        return model
    if in_channels == 1:
        log.info("folding the 3-channel VAE at %s to 1 channel (exact: repeat-in / average-out)", path)
        return fold_rgb_to_grey(model)
    raise ValueError(f"{path}: VAE has {model.config.in_channels} input channels, config asks for {in_channels}")


@dataclass
class VAEOutput:
    reconstruction: torch.Tensor  # (B, C, H, W)
    mean: torch.Tensor  # (B, c, h, w) posterior mean
    logvar: torch.Tensor  # (B, c, h, w)
    latent: torch.Tensor  # (B, c, h, w) sample (or mean)
    probe_logit: torch.Tensor  # (B,)


class NoduleVAE(nn.Module):
    """AutoencoderKL + linear probe on the flattened posterior mean."""

    def __init__(self, cfg: VAEConfig, autoencoder: AutoencoderKL | None = None):
        super().__init__()
        self.cfg = cfg
        self.autoencoder = autoencoder or (
            load_pretrained_autoencoder(cfg.pretrained_path, cfg.in_channels)
            if cfg.pretrained_path
            else build_autoencoder(cfg)
        )
        self.probe = nn.Linear(cfg.latent_numel, 1)

    @property
    def scaling_factor(self) -> float:
        if self.cfg.scaling_factor is None:
            raise ValueError(
                "this VAE has no scaling factor yet: it is computed after VAE training "
                "(set_scaling_factor / the VAE stage's export) or given as model.vae.scaling_factor"
            )
        return float(self.cfg.scaling_factor)

    def set_scaling_factor(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"scaling factor must be > 0, got {value}")
        self.cfg.scaling_factor = float(value)
        self.autoencoder.register_to_config(scaling_factor=float(value))

    def encode(self, x: torch.Tensor):
        return self.autoencoder.encode(x).latent_dist

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z).sample

    def probe_logit(self, mean: torch.Tensor) -> torch.Tensor:
        return self.probe(mean.flatten(1)).squeeze(-1)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> VAEOutput:
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if sample else posterior.mean
        return VAEOutput(self.decode(z), posterior.mean, posterior.logvar, z, self.probe_logit(posterior.mean))

    @torch.no_grad()
    def encode_for_diffusion(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean times the scaling factor: the latent the diffusion model sees."""
        return self.encode(x).mean * self.scaling_factor

    @torch.no_grad()
    def decode_from_diffusion(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latent -> image, clamped to the intensity range (the decoder is
        unconstrained; an out-of-range pixel is not a valid CT value)."""
        low, high = self.cfg.intensity_range
        return self.decode(z / self.scaling_factor).clamp(low, high)


@torch.no_grad()
def posterior_mean_scaling_factor(vae: NoduleVAE, batches) -> float:
    """1 / std of the posterior means over `batches` of images (B, C, H, W): the factor
    that gives the diffusion model unit-variance latents (LDM, Rombach et al. Sec. G)."""
    count, total, total_sq = 0, 0.0, 0.0
    for images in batches:
        mean = vae.encode(images).mean.double()
        count += mean.numel()
        total += float(mean.sum())
        total_sq += float((mean * mean).sum())
    if count == 0:
        raise ValueError("no images to compute the latent scaling factor from")
    variance = total_sq / count - (total / count) ** 2
    if not variance > 0:
        raise ValueError("the VAE maps every training image to the same latent: cannot scale it")
    return 1.0 / variance**0.5


VAE_CONFIG_FILE, VAE_WEIGHTS_FILE = "vae.json", "vae.safetensors"


def save_vae(vae: NoduleVAE, folder: str | Path) -> None:
    """VAE + probe as one folder (config JSON + safetensors), written atomically."""
    import json

    from safetensors.torch import save_file

    from cohortcast.config import to_dict
    from cohortcast.io.atomic import atomic_folder

    with atomic_folder(folder, overwrite=True) as tmp:
        (tmp / VAE_CONFIG_FILE).write_text(json.dumps(to_dict(vae.cfg), indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}, str(tmp / VAE_WEIGHTS_FILE))


def load_vae(folder: str | Path) -> NoduleVAE:
    import json

    from safetensors.torch import load_file

    from cohortcast.config import from_dict

    folder = Path(folder)
    if not (folder / VAE_CONFIG_FILE).is_file():
        raise MissingInputError(f"{folder}: no {VAE_CONFIG_FILE}; not a saved NoduleVAE")
    cfg = from_dict(VAEConfig, json.loads((folder / VAE_CONFIG_FILE).read_text()))
    cfg.pretrained_path = None  # the saved weights replace whatever it started from
    vae = NoduleVAE(cfg)
    vae.load_state_dict(load_file(str(folder / VAE_WEIGHTS_FILE)))
    return vae.eval()

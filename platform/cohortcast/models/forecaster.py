"""The Forecaster: VAE + LLM conditioner (soft prompts) + temporal context + denoiser +
scheduler config, saved to and loaded from one folder. Training, batch forecasting and
serving all use this object.

Folder layout:
    forecaster.json      format version, cohortcast version, the ForecasterConfig, shapes,
                         the identity of the frozen LLM (its weights are not copied)
    model.safetensors    every trainable tensor (VAE, probe, temporal, denoiser, soft prompts)
    scheduler/           diffusers DDIM scheduler config
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cohortcast import __version__
from cohortcast.config import from_dict, to_dict
from cohortcast.config.models import ForecasterConfig
from cohortcast.data.atomic import atomic_folder
from cohortcast.inference.sampler import forecast_latents, run_fixed_chunks
from cohortcast.models.conditioner import SoftPromptConditioner
from cohortcast.models.denoiser import ConditionalDenoiser
from cohortcast.models.errors import ForecasterLoadError  # noqa: F401 - re-exported
from cohortcast.models.schedulers import inference_scheduler, train_scheduler
from cohortcast.models.temporal import TemporalContextEncoder
from cohortcast.models.vae import NoduleVAE

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "forecaster.json", "model.safetensors"


@dataclass
class Forecast:
    samples: torch.Tensor  # (B, N, C, H, W) decoded images
    mean: torch.Tensor  # (B, C, H, W)
    variance: torch.Tensor  # (B, C, H, W) pixel-wise over samples
    latents: torch.Tensor  # (B, N, c, h, w)


def _llm_identity(conditioner: SoftPromptConditioner | None) -> dict | None:
    if conditioner is None:
        return None
    config = conditioner.lm.config
    return {"model_type": config.model_type, "hidden_size": conditioner.hidden_size,
            "vocab_size": conditioner.lm.get_input_embeddings().num_embeddings}


class Forecaster(nn.Module):
    def __init__(self, cfg: ForecasterConfig, conditioner: SoftPromptConditioner | None = None):
        super().__init__()
        self.cfg = cfg
        self.vae = NoduleVAE(cfg.vae)
        if conditioner is None and cfg.conditioner.llm_path:
            conditioner = SoftPromptConditioner(cfg.conditioner)
        self.conditioner = conditioner
        side = cfg.vae.sample_size // cfg.vae.downsample_factor
        self.latent_shape = (cfg.vae.latent_channels, side, side)
        d = cfg.denoiser.cross_attention_dim
        self.temporal = TemporalContextEncoder(cfg.temporal, cfg.vae.latent_channels * side * side, d)
        self.denoiser = ConditionalDenoiser(cfg.denoiser, cfg.vae.latent_channels, side,
                                            conditioner.hidden_size if conditioner else None)

    def train_scheduler(self):
        return train_scheduler(self.cfg.scheduler)

    def inference_scheduler(self):
        return inference_scheduler(self.cfg.scheduler)

    def context(self, ehr_texts: list[str] | None, prior_latents: torch.Tensor, days_before_target: torch.Tensor,
                exam_mask: torch.Tensor, horizon_days: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, D) cross-attention context: [EHR, temporal summary, target date]."""
        ehr = self.conditioner(ehr_texts) if (self.conditioner is not None and ehr_texts is not None) else None
        temporal, target = self.temporal(prior_latents, days_before_target, exam_mask, horizon_days)
        return self.denoiser.build_context(ehr, temporal, target, drop)

    def encode_priors(self, baseline_latents: torch.Tensor, horizon_days: torch.Tensor,
                      prior_images: torch.Tensor | None, days_before_target: torch.Tensor | None,
                      exam_mask: torch.Tensor | None, encode=None):
        """Prior exams for the temporal encoder; NAMD's single baseline when none are given.
        `encode` maps images to diffusion latents (default: the VAE, unchunked)."""
        if prior_images is None:
            return baseline_latents[:, None], horizon_days[:, None].float(), torch.ones(
                baseline_latents.shape[0], 1, dtype=torch.bool, device=baseline_latents.device)
        b, k = prior_images.shape[:2]
        latents = (encode or self.vae.encode_for_diffusion)(prior_images.flatten(0, 1)).view(b, k, *self.latent_shape)
        return latents, days_before_target.float(), exam_mask.bool()

    def _chunked(self, fn, tensor: torch.Tensor) -> torch.Tensor:
        return run_fixed_chunks(fn, [tensor], self.cfg.scheduler.micro_batch)

    @torch.no_grad()
    def forecast(self, baseline_images: torch.Tensor, horizon_days: torch.Tensor, case_ids: list[str],
                 ehr_texts: list[str] | None = None, prior_images: torch.Tensor | None = None,
                 days_before_target: torch.Tensor | None = None, exam_mask: torch.Tensor | None = None,
                 num_samples: int | None = None, seed: int | list[int] = 0, steps: int | None = None,
                 guidance_scale: float | None = None, eta: float | None = None) -> Forecast:
        """Baseline crops (B, C, H, W) in the ingestion intensity range -> N forecasts each;
        `seed` for all cases or one per case.
        Every network call runs in fixed micro-batches (scheduler.micro_batch), so a case's
        forecast is bit-identical whatever other cases share the call."""
        s = self.cfg.scheduler
        if ehr_texts is not None and self.conditioner is None:
            raise ValueError("this Forecaster has no LLM conditioner (model.conditioner.llm_path unset): "
                             "it cannot use EHR text; pass ehr_texts=None")
        if ehr_texts is not None and len(ehr_texts) != len(case_ids):
            raise ValueError(f"{len(ehr_texts)} EHR texts for {len(case_ids)} cases")
        baseline = self._chunked(self.vae.encode_for_diffusion, baseline_images)
        priors = self.encode_priors(baseline, horizon_days, prior_images, days_before_target, exam_mask,
                                    encode=lambda x: self._chunked(self.vae.encode_for_diffusion, x))
        ehr = None
        if self.conditioner is not None and ehr_texts is not None:
            index = torch.arange(len(ehr_texts)).view(-1, 1)
            ehr = run_fixed_chunks(lambda idx: self.conditioner([ehr_texts[int(i)] for i in idx[:, 0]]), [index],
                                   s.micro_batch)
        def context_rows(ehr_rows, latents, days, mask, horizon):
            temporal, target = self.temporal(latents, days, mask, horizon)
            return self.denoiser.build_context(ehr_rows if ehr is not None else None, temporal, target)

        ehr_column = ehr if ehr is not None else torch.zeros(len(case_ids), 1)
        context = run_fixed_chunks(context_rows, [ehr_column, *priors, horizon_days.float()], s.micro_batch)
        n = num_samples or s.num_samples
        lat = forecast_latents(self.denoiser, self.inference_scheduler(), baseline, context, case_ids, n, seed,
                               steps or s.inference_steps, s.guidance_scale if guidance_scale is None else guidance_scale,
                               s.eta if eta is None else eta, s.micro_batch)
        images = self._chunked(self.vae.decode_from_diffusion, lat.samples.flatten(0, 1))
        images = images.view(baseline_images.shape[0], n, *images.shape[1:])
        variance = images.var(dim=1) if n > 1 else torch.zeros_like(images[:, 0])
        return Forecast(images, images.mean(dim=1), variance, lat.samples)

    # ----- persistence -------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write the folder atomically (temp name, then rename)."""
        with atomic_folder(folder, overwrite=True) as tmp:
            meta = {"format_version": FORMAT_VERSION, "cohortcast_version": __version__,
                    "config": to_dict(self.cfg), "latent_shape": list(self.latent_shape),
                    "llm": _llm_identity(self.conditioner)}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp / WEIGHTS_FILE))
            self.inference_scheduler().save_pretrained(str(tmp / "scheduler"))

    @classmethod
    def load(cls, folder: str | Path, llm_path: str | None = None, map_location: str = "cpu") -> "Forecaster":
        """Rebuild from `folder`; `llm_path` overrides where the frozen LLM is on this machine."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ForecasterLoadError(f"{folder}: not a Forecaster folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        meta = json.loads((folder / CONFIG_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ForecasterLoadError(f"{folder}: format version {meta.get('format_version')} (written by cohortcast "
                                      f"{meta.get('cohortcast_version')}); this cohortcast {__version__} reads "
                                      f"version {FORMAT_VERSION}")
        cfg = from_dict(ForecasterConfig, meta["config"])
        if llm_path and meta.get("llm"):  # a Forecaster trained without an LLM ignores it
            cfg.conditioner.llm_path = llm_path
        if (meta.get("llm") is None) != (cfg.conditioner.llm_path is None):
            raise ForecasterLoadError(f"{folder}: saved {'with' if meta.get('llm') else 'without'} an LLM "
                                      "conditioner; conditioner.llm_path must match")
        model = cls(cfg)
        if meta.get("llm") and _llm_identity(model.conditioner) != meta["llm"]:
            raise ForecasterLoadError(f"{folder}: LLM at {cfg.conditioner.llm_path} is {_llm_identity(model.conditioner)}"
                                      f", the Forecaster was trained with {meta['llm']}")
        state = load_file(str(folder / WEIGHTS_FILE), device=map_location)
        expected = model.state_dict()
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [f"{k}: saved {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
                     if k in state and state[k].shape != v.shape]
        if problems:
            raise ForecasterLoadError(f"{folder}: weights do not fit the config ({len(problems)} problem(s)): "
                                      + "; ".join(problems[:5]))
        model.load_state_dict(state)
        return model.eval()

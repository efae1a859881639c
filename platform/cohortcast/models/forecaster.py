"""The Forecaster: VAE + LLM conditioner (soft prompts) + temporal context + denoiser +
scheduler config, saved to and loaded from one folder. Training, batch forecasting and
serving all use this object.

Folder layout:
    forecaster.json      format version, cohortcast version, the ForecasterConfig, shapes,
                         the identity of the frozen LLM (its weights are not copied), the
                         crop preprocessing it was trained with (models.preprocessing)
    model.safetensors    every trainable tensor (VAE, probe, temporal, denoiser, soft prompts)
    scheduler/           diffusers DDIM scheduler config
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cohortcast import __version__
from cohortcast.config import from_dict, to_dict
from cohortcast.config.models import ConditionerConfig, ForecasterConfig
from cohortcast.io.atomic import atomic_folder
from cohortcast.models.conditioner import SoftPromptConditioner
from cohortcast.models.denoiser import ConditionalDenoiser
from cohortcast.models.ehr_structured import EHR_VECTOR_SIZE, StructuredEHREncoder
from cohortcast.models.errors import ForecasterLoadError  # noqa: F401 - re-exported
from cohortcast.models.preprocessing import CropPreprocessing
from cohortcast.models.sampler import forecast_latents, run_fixed_chunks
from cohortcast.models.schedulers import default_eta, inference_scheduler, train_scheduler
from cohortcast.models.temporal import TemporalContextEncoder
from cohortcast.models.vae import NoduleVAE

# 2: scaling factor, change target and EHR encoder kind in the config; Forecast latents
# are follow-up latents. 3: "preprocessing", the crop geometry and intensity scaling of
# the training crops (null when unknown). Version 2 folders still load, without it.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
CONFIG_FILE, WEIGHTS_FILE = "forecaster.json", "model.safetensors"


@dataclass
class Forecast:
    samples: torch.Tensor  # (B, N, C, H, W) decoded images
    mean: torch.Tensor  # (B, C, H, W)
    variance: torch.Tensor  # (B, C, H, W) pixel-wise over samples
    latents: torch.Tensor  # (B, N, c, h, w) forecast diffusion latents (follow-up, not change)
    baseline_latent: torch.Tensor  # (B, c, h, w) the baseline's diffusion latent


log = logging.getLogger(__name__)

EHRRecords = Sequence[Mapping[str, Any]]


def build_ehr_encoder(cfg: ConditionerConfig):
    """The EHR encoder the config asks for, or None (no EHR conditioning)."""
    if cfg.kind == "structured":
        return StructuredEHREncoder(cfg)
    return SoftPromptConditioner(cfg) if cfg.llm_path else None


def _llm_identity(conditioner) -> dict | None:
    if conditioner is None:
        return None
    if isinstance(conditioner, StructuredEHREncoder):
        return {"model_type": "structured", "hidden_size": conditioner.hidden_size, "features": EHR_VECTOR_SIZE}
    config = conditioner.lm.config
    return {
        "model_type": config.model_type,
        "hidden_size": conditioner.hidden_size,
        "vocab_size": conditioner.lm.get_input_embeddings().num_embeddings,
    }


def check_preprocessing(preprocessing: CropPreprocessing | None, cfg: ForecasterConfig) -> None:
    """The crops must be the VAE's input size: the temporal encoder's width depends on it."""
    if preprocessing is not None and preprocessing.crop_size != cfg.vae.sample_size:
        raise ValueError(
            f"preprocessing.crop_size {preprocessing.crop_size} does not match the Forecaster's "
            f"model.vae.sample_size {cfg.vae.sample_size}"
        )


def _read_meta(folder: Path) -> dict:
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ForecasterLoadError(f"{folder}: not a Forecaster folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ForecasterLoadError(
            f"{folder}: format version {meta.get('format_version')} (written by cohortcast "
            f"{meta.get('cohortcast_version')}); this cohortcast {__version__} reads "
            f"versions {list(READABLE_VERSIONS)}"
        )
    return meta


def read_preprocessing(folder: str | Path) -> CropPreprocessing | None:
    """The crop preprocessing saved with a Forecaster folder, without loading its weights;
    None for a folder saved before it was recorded (format 2) or without it."""
    saved = _read_meta(Path(folder)).get("preprocessing")
    return CropPreprocessing.from_dict(saved) if saved else None


class Forecaster(nn.Module):
    def __init__(
        self,
        cfg: ForecasterConfig,
        conditioner: nn.Module | None = None,
        preprocessing: CropPreprocessing | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        # How input crops are cut and scaled (saved with the model); None = unknown
        # (a format-2 folder): callers then fall back to their own ingest settings.
        check_preprocessing(preprocessing, cfg)
        self.preprocessing = preprocessing
        self.vae = NoduleVAE(cfg.vae)
        self.conditioner = conditioner if conditioner is not None else build_ehr_encoder(cfg.conditioner)
        self.latent_shape = cfg.vae.latent_shape
        d = cfg.denoiser.cross_attention_dim
        self.temporal = TemporalContextEncoder(cfg.temporal, cfg.vae.latent_numel, d)
        self.denoiser = ConditionalDenoiser(
            cfg.denoiser,
            cfg.vae.latent_channels,
            cfg.vae.latent_side,
            self.conditioner.hidden_size if self.conditioner is not None else None,
        )

    def train_scheduler(self):
        return train_scheduler(self.cfg.scheduler)

    def inference_scheduler(self, sampler: str | None = None):
        return inference_scheduler(self.cfg.scheduler, sampler)

    # ----- what the denoiser generates: the scaled change, or the follow-up latent ------
    @property
    def change_scale(self) -> float:
        scale = self.cfg.denoiser.change_scale
        if scale is None:
            raise ValueError(
                "model.denoiser.change_scale is unset: it is computed before the conditional stage "
                "(training) or saved with a trained Forecaster"
            )
        return float(scale)

    def to_generated(self, follow_up: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        """Follow-up latent -> the denoiser's target space."""
        if self.cfg.denoiser.target == "change":
            return (follow_up - baseline) * self.change_scale
        return follow_up

    def from_generated(self, generated: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        """Inverse of to_generated; `baseline` broadcasts (e.g. (B, 1, c, h, w) for samples)."""
        if self.cfg.denoiser.target == "change":
            return baseline + generated / self.change_scale
        return generated

    def regression_timestep(self) -> int:
        """The regressor's fixed timestep: its input is the zero 'fully noised' latent."""
        return self.cfg.scheduler.num_train_timesteps - 1

    def regress(self, baseline: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The no-diffusion baseline (kind "regression"): one pass, output in target space."""
        t = torch.full((baseline.shape[0],), self.regression_timestep(), device=baseline.device, dtype=torch.long)
        return self.denoiser(torch.zeros_like(baseline), t, baseline, context)

    def encode_ehr(self, ehr: EHRRecords | None) -> torch.Tensor | None:
        if ehr is None or self.conditioner is None:
            return None
        return self.conditioner.encode_records(ehr)

    def context(
        self,
        ehr: EHRRecords | None,
        prior_latents: torch.Tensor,
        days_before_target: torch.Tensor,
        exam_mask: torch.Tensor,
        horizon_days: torch.Tensor,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 3, D) cross-attention context: [EHR, temporal summary, target date]."""
        temporal, target = self.temporal(prior_latents, days_before_target, exam_mask, horizon_days)
        return self.denoiser.build_context(self.encode_ehr(ehr), temporal, target, drop)

    def encode_priors(
        self,
        baseline_latents: torch.Tensor,
        horizon_days: torch.Tensor,
        prior_images: torch.Tensor | None,
        days_before_target: torch.Tensor | None,
        exam_mask: torch.Tensor | None,
        encode=None,
    ):
        """Prior exams for the temporal encoder; NAMD's single baseline when none are given.
        `encode` maps images to diffusion latents (default: the VAE, unchunked)."""
        if prior_images is None:
            return (
                baseline_latents[:, None],
                horizon_days[:, None].float(),
                torch.ones(baseline_latents.shape[0], 1, dtype=torch.bool, device=baseline_latents.device),
            )
        b, k = prior_images.shape[:2]
        latents = (encode or self.vae.encode_for_diffusion)(prior_images.flatten(0, 1)).view(b, k, *self.latent_shape)
        return latents, days_before_target.float(), exam_mask.bool()

    def _chunked(self, fn, tensor: torch.Tensor) -> torch.Tensor:
        return run_fixed_chunks(fn, [tensor], self.cfg.scheduler.micro_batch)

    @torch.no_grad()
    def forecast(
        self,
        baseline_images: torch.Tensor,
        horizon_days: torch.Tensor,
        case_ids: list[str],
        ehr: EHRRecords | None = None,
        prior_images: torch.Tensor | None = None,
        days_before_target: torch.Tensor | None = None,
        exam_mask: torch.Tensor | None = None,
        num_samples: int | None = None,
        seed: int | list[int] = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        sampler: str | None = None,
    ) -> Forecast:
        """Baseline crops (B, C, H, W) in the ingestion intensity range -> N forecasts each;
        `ehr`: one EHR record (manifest column names) per case, for a Forecaster with an
        EHR encoder; `seed` for all cases or one per case. `steps`, `guidance_scale`,
        `eta` and `sampler` ("ddim" | "dpmsolver++") default to the model's scheduler config.
        Every network call runs in fixed micro-batches (scheduler.micro_batch), so a case's
        forecast is bit-identical whatever other cases share the call."""
        s = self.cfg.scheduler
        if ehr is not None and self.conditioner is None:
            raise ValueError(
                "this Forecaster has no EHR encoder (model.conditioner: kind llm without llm_path): "
                "it cannot use EHR; pass ehr=None"
            )
        if ehr is not None and len(ehr) != len(case_ids):
            raise ValueError(f"{len(ehr)} EHR records for {len(case_ids)} cases")
        baseline = self._chunked(self.vae.encode_for_diffusion, baseline_images)
        priors = self.encode_priors(
            baseline,
            horizon_days,
            prior_images,
            days_before_target,
            exam_mask,
            encode=lambda x: self._chunked(self.vae.encode_for_diffusion, x),
        )
        ehr_rows = None
        if self.conditioner is not None and ehr is not None:
            index = torch.arange(len(ehr)).view(-1, 1)
            ehr_rows = run_fixed_chunks(
                lambda idx: self.encode_ehr([ehr[int(i)] for i in idx[:, 0]]), [index], s.micro_batch
            )

        def context_rows(ehr_part, latents, days, mask, horizon):
            temporal, target = self.temporal(latents, days, mask, horizon)
            return self.denoiser.build_context(ehr_part if ehr_rows is not None else None, temporal, target)

        ehr_column = ehr_rows if ehr_rows is not None else torch.zeros(len(case_ids), 1)
        context = run_fixed_chunks(context_rows, [ehr_column, *priors, horizon_days.float()], s.micro_batch)
        n = num_samples or s.num_samples
        if self.cfg.kind == "regression":  # deterministic: every "sample" is the one prediction
            generated = run_fixed_chunks(self.regress, [baseline, context], s.micro_batch)[:, None].expand(
                -1, n, *self.latent_shape
            )
        else:
            generated = forecast_latents(
                self.denoiser,
                self.inference_scheduler(sampler),
                baseline,
                context,
                case_ids,
                n,
                seed,
                steps or s.inference_steps,
                s.guidance_scale if guidance_scale is None else guidance_scale,
                default_eta(s, sampler) if eta is None else eta,
                s.micro_batch,
            ).samples
        latents = self.from_generated(generated, baseline[:, None])  # (B, N, c, h, w)
        images = self._chunked(self.vae.decode_from_diffusion, latents.flatten(0, 1))
        images = images.view(baseline_images.shape[0], n, *images.shape[1:])
        if self.cfg.compose == "baseline_plus_change":
            low, high = self.cfg.vae.intensity_range
            decoded_baseline = self._chunked(self.vae.decode_from_diffusion, baseline)
            images = (baseline_images[:, None].to(images.dtype) + images - decoded_baseline[:, None]).clamp(low, high)
        variance = images.var(dim=1) if n > 1 else torch.zeros_like(images[:, 0])
        return Forecast(images, images.mean(dim=1), variance, latents, baseline)

    # ----- persistence -------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write the folder atomically (temp name, then rename)."""
        check_preprocessing(self.preprocessing, self.cfg)  # it may have been set after __init__
        with atomic_folder(folder, overwrite=True) as tmp:
            meta = {
                "format_version": FORMAT_VERSION,
                "cohortcast_version": __version__,
                "config": to_dict(self.cfg),
                "latent_shape": list(self.latent_shape),
                "llm": _llm_identity(self.conditioner),
                "preprocessing": self.preprocessing.to_dict() if self.preprocessing else None,
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp / WEIGHTS_FILE))
            self.inference_scheduler().save_pretrained(str(tmp / "scheduler"))

    @classmethod
    def load(cls, folder: str | Path, llm_path: str | None = None, map_location: str = "cpu") -> Forecaster:
        """Rebuild from `folder`; `llm_path` overrides where the frozen LLM is on this machine."""
        folder = Path(folder)
        meta = _read_meta(folder)
        cfg = from_dict(ForecasterConfig, meta["config"])
        if llm_path and meta.get("llm"):  # a Forecaster trained without an LLM ignores it
            cfg.conditioner.llm_path = llm_path
        if cfg.conditioner.kind == "llm" and (meta.get("llm") is None) != (cfg.conditioner.llm_path is None):
            raise ForecasterLoadError(
                f"{folder}: saved {'with' if meta.get('llm') else 'without'} an LLM "
                "conditioner; conditioner.llm_path must match"
            )
        model = cls(cfg)
        if meta.get("llm") and _llm_identity(model.conditioner) != meta["llm"]:
            raise ForecasterLoadError(
                f"{folder}: LLM at {cfg.conditioner.llm_path} is {_llm_identity(model.conditioner)}"
                f", the Forecaster was trained with {meta['llm']}"
            )
        state = load_file(str(folder / WEIGHTS_FILE), device=map_location)
        expected = model.state_dict()
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [
            f"{k}: saved {tuple(state[k].shape)}, model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        if problems:
            raise ForecasterLoadError(
                f"{folder}: weights do not fit the config ({len(problems)} problem(s)): " + "; ".join(problems[:5])
            )
        model.load_state_dict(state)
        if meta.get("preprocessing"):
            model.preprocessing = CropPreprocessing.from_dict(meta["preprocessing"])
        else:
            log.warning(
                "%s: saved without its crop preprocessing (format %s); callers use their own ingest "
                "settings, which must match the training crops",
                folder,
                meta.get("format_version"),
            )
        return model.eval()

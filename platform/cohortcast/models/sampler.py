"""Seeded multi-sample forecasting with DDIM or DPM-Solver++.

B cases x N samples run as one batch of B*N (in micro-batches if asked). Sample k of
case c starts from noise drawn from its own generator, seeded by a hash of
(base seed, case id, k), on the CPU; with DDIM's eta > 0 its per-step noise comes from
its own generator too (DPM-Solver++ adds none: the start noise is the whole sample). So a sample's trajectory never depends on what else is in the batch:
a case gives the same forecast alone or inside any batch.

Latents may be any shape per case: (c, h, w) maps (NAMD's U-Net) or (1 + N, dim) study
tokens (CLDM's token denoiser); the denoiser is anything with the Denoiser protocol.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers import DDIMScheduler


class Denoiser(Protocol):
    """What the sampler calls: models.denoiser.ConditionalDenoiser, models.token_denoiser.TokenDenoiser."""

    def __call__(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, baseline: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor: ...

    def null(self, batch: int) -> torch.Tensor: ...


def sample_seed(base_seed: int, case_id: str, k: int) -> int:
    digest = hashlib.sha256(f"{base_seed}\x1f{case_id}\x1f{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def run_fixed_chunks(fn, tensors: list[torch.Tensor], chunk: int) -> torch.Tensor:
    """fn over rows in chunks of exactly `chunk` rows (the last padded by repeating its
    final row, padding outputs dropped), so every row sees the same kernel shapes."""
    n = tensors[0].shape[0]
    outputs = []
    for start in range(0, n, chunk):
        # One memory layout for every chunk: sampled latents came back channels-last, and a
        # padded (torch.cat) chunk would be contiguous while an unpadded slice is not; CPU
        # convolutions pick other kernels (other bits) for the two layouts.
        part = [t[start : start + chunk].contiguous() for t in tensors]
        real = part[0].shape[0]
        if real < chunk:
            part = [torch.cat([p, p[-1:].expand(chunk - real, *p.shape[1:])]) for p in part]
        outputs.append(fn(*part)[:real])
    return torch.cat(outputs)


def seeded_noise(seeds: list[int], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """(len(seeds), *shape); drawn on the CPU so the same seed gives the same noise on any device."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


@torch.no_grad()
def reverse_loop(
    denoiser: Denoiser,
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    baseline: torch.Tensor,
    context: torch.Tensor,
    steps: int,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """The reverse process for a batch with `scheduler` (DDIM, or any diffusers scheduler
    with the same step API, such as DPM-Solver++); classifier-free guidance when scale != 1.
    Multistep solvers keep state between steps: set_timesteps resets it, and each call
    works on its own copy so concurrent calls never share it."""
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(steps, device=noise.device)
    is_ddim = isinstance(scheduler, DDIMScheduler)
    if eta > 0 and not is_ddim:
        raise ValueError(f"eta > 0 is DDIM's stochastic sampling; {type(scheduler).__name__} takes no eta")
    x = noise * scheduler.init_noise_sigma
    null = denoiser.null(x.shape[0])
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        if guidance_scale != 1.0:
            eps_uncond, eps_cond = denoiser(
                torch.cat([model_in, model_in]), t, torch.cat([baseline, baseline]), torch.cat([null, context])
            ).chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        else:
            eps = denoiser(model_in, t, baseline, context)
        if is_ddim:
            x = scheduler.step(eps, t, x, eta=eta, generator=generators if eta > 0 else None).prev_sample
        else:
            x = scheduler.step(eps, t, x).prev_sample
    return x


@dataclass
class LatentForecast:
    samples: torch.Tensor  # (B, N, *latent) e.g. (B, N, c, h, w)
    mean: torch.Tensor  # (B, *latent)
    variance: torch.Tensor  # (B, *latent), element-wise over the N samples (unbiased when N > 1)


def forecast_latents(
    denoiser: Denoiser,
    scheduler: DDIMScheduler,
    baseline: torch.Tensor,
    context: torch.Tensor,
    case_ids: list[str],
    num_samples: int,
    base_seed: int | Sequence[int],
    steps: int,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    micro_batch: int | None = None,
) -> LatentForecast:
    """baseline (B, *latent), e.g. (B, c, h, w), and context (B, T, D) for B cases -> N samples each.
    `base_seed`: one for all cases, or one per case (the service batches requests with
    different seeds). Pass a fixed `micro_batch` for batch-independent results (None:
    one batch of B*N)."""
    if len(case_ids) != baseline.shape[0] or context.shape[0] != baseline.shape[0]:
        raise ValueError(f"{len(case_ids)} case ids, {baseline.shape[0]} baselines, {context.shape[0]} contexts")
    case_seeds = [base_seed] * len(case_ids) if isinstance(base_seed, int) else [int(s) for s in base_seed]
    if len(case_seeds) != len(case_ids):
        raise ValueError(f"{len(case_seeds)} seeds for {len(case_ids)} cases")
    if len(set(zip(case_ids, case_seeds))) != len(case_ids):
        raise ValueError("(case id, seed) pairs must be unique within a call (they seed the samples)")
    seeds = [sample_seed(b, c, k) for c, b in zip(case_ids, case_seeds) for k in range(num_samples)]
    noise = seeded_noise(seeds, tuple(baseline.shape[1:]), baseline.device, baseline.dtype)
    base = baseline.repeat_interleave(num_samples, dim=0)
    ctx = context.repeat_interleave(num_samples, dim=0)
    seed_rows = torch.tensor(seeds, dtype=torch.int64).view(-1, 1)  # travels with its rows through padding

    def run(noise_part, base_part, ctx_part, seed_part):
        generators = [torch.Generator(device=noise.device).manual_seed(int(s) ^ 0x5EED) for s in seed_part[:, 0]]
        return reverse_loop(
            denoiser, scheduler, noise_part, base_part, ctx_part, steps, guidance_scale, eta, generators
        )

    samples = run_fixed_chunks(run, [noise, base, ctx, seed_rows], micro_batch or len(seeds))
    samples = samples.view(baseline.shape[0], num_samples, *baseline.shape[1:])
    variance = samples.var(dim=1) if num_samples > 1 else torch.zeros_like(samples[:, 0])
    return LatentForecast(samples, samples.mean(dim=1), variance)

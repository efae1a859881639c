"""Stage c on Ray Train + DeepSpeed: unconditional pre-training on the latent cache."""

import json
import sys

import pytest
import ray.train
import torch
from ray import cloudpickle

from cohortcast.config.models import ForecasterConfig, VAEConfig
from cohortcast.config.training import ScalingSettings, StageConfig
from cohortcast.inference.latent_cache import build_latent_cache
from cohortcast.models.vae import NoduleVAE, save_vae
from cohortcast.training.export import consolidated_state_dict
from cohortcast.training.ldm_stage import build_denoiser, latent_dataset, ldm_unconditional_worker_loop
from cohortcast.training.runner import run_stage

pytestmark = pytest.mark.ray


# Ray Train's controller unpickles the callback; it cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ReportRecorder(ray.train.UserCallback):
    """Appends each Ray Train report's step to a file (it runs in the Train controller)."""

    def __init__(self, path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": metrics[0]["step"], "checkpoint": checkpoint is not None}) + "\n")


def test_unconditional_stage_trains_the_denoiser_from_the_cache(tiny_ingested, tmp_path):
    """Stage c, 2 workers x 1 CPU on the session's 2 CPUs, the latents streamed (not
    materialised) while the workers hold their CPUs: the deadlock case; the workers
    report to Ray Train only at checkpoints (every 2 steps), not every logged step."""
    torch.manual_seed(0)
    vae = NoduleVAE(VAEConfig())
    vae.set_scaling_factor(1.0)
    save_vae(vae, tmp_path / "vae")
    cache = build_latent_cache(tiny_ingested, tmp_path / "vae", tmp_path / "cache", actors=1)
    model = ForecasterConfig()
    stage = StageConfig(max_steps=4, micro_batch_size=2, lr=1e-3, warmup_steps=1, zero_stage=1, checkpoint_every=2)
    result = run_stage(
        "ldm-uncond",
        ldm_unconditional_worker_loop,
        {"stage": stage, "model": model},
        {"train": latent_dataset(cache["path"])},
        ScalingSettings(num_workers=2, storage_path=str(tmp_path / "runs")),
        callbacks=[ReportRecorder(tmp_path / "reports.jsonl")],
        report_every_log=False,
    )
    assert result.error is None and result.metrics["step"] == 4
    reports = [json.loads(line) for line in (tmp_path / "reports.jsonl").read_text().splitlines()]
    assert reports == [{"step": 2, "checkpoint": True}, {"step": 4, "checkpoint": True}]
    loss = result.metrics["loss/total"]
    assert 0 < loss < 10  # v-MSE (the default prediction type) of a fresh model is about 1
    denoiser = build_denoiser(model)
    before = denoiser.unet.conv_in.weight.clone()
    denoiser.load_state_dict(consolidated_state_dict(result.checkpoint))
    assert not torch.equal(before, denoiser.unet.conv_in.weight)

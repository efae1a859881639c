"""A worker that dies mid-run: FailureConfig restarts the workers and the stage loop
resumes from the last reported checkpoint instead of step 0. One worker: the restart
path is the same, and two gloo workers cost another minute of CI (the survivor hangs in
its collective until the controller tears the group down)."""

import sys
from pathlib import Path

import pytest
import ray.cloudpickle

from cohortcast.config.models import VAEConfig, VAELossConfig
from cohortcast.config.training import ScalingSettings, StageConfig
from cohortcast.training.runner import run_stage
from cohortcast.training.vae_stage import vae_dataset

pytestmark = pytest.mark.ray
# Ray workers cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def dying_vae_loop(config):
    from cohortcast.models.vae import NoduleVAE
    from cohortcast.models.vae_loss import vae_loss
    from cohortcast.training.stage_loop import run_stage_loop

    marker = Path(config["marker"])
    model_cfg = config["model"]

    def loss_fn(engine, batch):
        if engine.global_steps == 3 and not marker.exists():
            marker.write_text("died once")
            raise RuntimeError("simulated worker death at step 3")
        out = engine(batch["image"])
        return vae_loss(out, batch["image"], batch["features"], batch["label"], model_cfg.loss)

    run_stage_loop(config["stage"], lambda: NoduleVAE(model_cfg), loss_fn)


def test_worker_death_is_retried_from_the_checkpoint(ray_session, tiny_ingested, tmp_path):
    data = ray_session.data.from_items(vae_dataset(tiny_ingested).take(4))
    stage = StageConfig(max_steps=5, micro_batch_size=2, warmup_steps=1, zero_stage=2, checkpoint_every=2)
    model = VAEConfig(loss=VAELossConfig(perceptual=0.0))
    result = run_stage(
        "vae-dies",
        dying_vae_loop,
        {"stage": stage, "model": model, "marker": str(tmp_path / "died")},
        {"train": data},
        ScalingSettings(num_workers=1, storage_path=str(tmp_path / "runs"), max_failures=1),
    )
    assert (tmp_path / "died").exists()  # the failure really happened
    assert result.error is None
    assert result.metrics["step"] == 5 and result.metrics["resumed_from"] == 2

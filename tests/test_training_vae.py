"""Stage a on Ray Train + DeepSpeed ZeRO-2 with 2 CPU workers (gloo)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cohortcast.config.models import VAEConfig, VAELossConfig
from cohortcast.config.training import ScalingSettings, StageConfig
from cohortcast.models.vae import NoduleVAE
from cohortcast.training.export import consolidated_state_dict
from cohortcast.training.runner import run_stage
from cohortcast.training.vae_stage import vae_dataset, vae_worker_loop

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def fixed_batch(ray_session, tiny_ingested):
    """4 ingested 32 px crops: with 2 workers x micro-batch 2, every step sees the same rows."""
    return ray_session.data.from_items(vae_dataset(tiny_ingested).take(4))


def _stage(**kw):
    base = dict(max_steps=8, micro_batch_size=2, lr=2e-3, warmup_steps=1, zero_stage=2, log_every=1, checkpoint_every=1)
    base.update(kw)
    return StageConfig(**base)


def _scaling(tmp_path, **kw):
    return ScalingSettings(num_workers=2, storage_path=str(tmp_path / "ray_results"), checkpoints_to_keep=50, **kw)


MODEL = VAEConfig(loss=VAELossConfig(perceptual=0.0, kl=1e-4))


def test_zero2_on_two_cpu_workers_loss_falls(fixed_batch, tmp_path):
    result = run_stage(
        "vae", vae_worker_loop, {"stage": _stage(), "model": MODEL}, {"train": fixed_batch}, _scaling(tmp_path)
    )
    assert result.error is None
    history = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["step"])
    assert [m["step"] for m in history] == list(range(1, 9))
    losses = [m["loss/total"] for m in history]
    assert all(v == v and abs(v) < 1e6 for v in losses)  # finite
    assert losses[-1] < 0.8 * losses[0], losses
    assert history[0]["lr"] < history[2]["lr"]  # warmup, then cosine decay
    assert history[-1]["lr"] < history[2]["lr"]
    # ZeRO-2 sharded optimizer state: one shard per rank inside the checkpoint.
    shards = sorted(p.name for p in (tmp_path / "ray_results").rglob("*optim_states.pt"))
    assert any("zero_pp_rank_0" in s for s in shards) and any("zero_pp_rank_1" in s for s in shards)
    # The trained weights come back out of the sharded checkpoint and load into the model.
    trained = NoduleVAE(MODEL)
    initial = {k: v.clone() for k, v in trained.state_dict().items()}
    trained.load_state_dict(consolidated_state_dict(result.checkpoint))
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, initial[k])]
    assert "probe.weight" in changed and "autoencoder.encoder.conv_in.weight" in changed
    # World rank 0 printed its progress line every log_every (1) steps to the worker's
    # stderr, what Ray streams to the driver and `ray job logs -f` shows.
    lines = {int(m["step"]): m for line in _worker_stderr() if (m := PROGRESS.search(line))}
    assert sorted(lines) == list(range(1, 9))
    assert sum(bool(PROGRESS.search(line)) for line in _worker_stderr()) == 8  # rank 1 prints none
    assert all(float(m["rate"]) > 0 and re.fullmatch(r"\d+s|\d+m\d\ds|\d+h\d\dm", m["eta"]) for m in lines.values())
    assert lines[8]["eta"] == "0s"
    assert [float(lines[k]["loss"]) for k in (1, 8)] == pytest.approx(
        [history[0]["loss/total"], history[-1]["loss/total"]], rel=1e-3
    )


PROGRESS = re.compile(r"stage vae step (?P<step>\d+)/8 loss (?P<loss>\S+) (?P<rate>[\d.]+) samples/s ETA (?P<eta>\S+)$")


def _worker_stderr() -> list[str]:
    import ray

    # this session's logs (another Ray session on the machine may own session_latest)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return [line for f in logs.glob("worker-*.err") for line in f.read_text(errors="replace").splitlines()]


def test_rerun_resumes_from_the_saved_step(fixed_batch, tmp_path):
    first = run_stage(
        "vae-resume",
        vae_worker_loop,
        {"stage": _stage(max_steps=4, checkpoint_every=2), "model": MODEL},
        {"train": fixed_batch},
        _scaling(tmp_path),
    )
    assert first.metrics["step"] == 4 and first.metrics["resumed_from"] == 0
    second = run_stage(
        "vae-resume",
        vae_worker_loop,
        {"stage": _stage(max_steps=6, checkpoint_every=2), "model": MODEL},
        {"train": fixed_batch},
        _scaling(tmp_path),
    )
    assert second.metrics["resumed_from"] == 4 and second.metrics["step"] == 6

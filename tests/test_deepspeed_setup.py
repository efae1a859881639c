"""The DeepSpeed config a stage runs with: ZeRO-2 on one rank runs as ZeRO-1, with the
same weights and interchangeable checkpoints (so that choice cannot change a result or
strand a resumed run)."""

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import free_port

from cohortcast.config.training import StageConfig
from cohortcast.training.deepspeed_setup import Precision, deepspeed_config, effective_zero_stage


@pytest.mark.parametrize(
    ("requested", "world", "expected"),
    [(2, 1, 1), (2, 2, 2), (2, 8, 2), (1, 1, 1), (0, 1, 0), (3, 1, 3), (3, 4, 3)],
)
def test_effective_zero_stage(requested, world, expected):
    assert effective_zero_stage(requested, world) == expected
    stage = StageConfig(max_steps=10, micro_batch_size=2, zero_stage=requested)
    config = deepspeed_config(stage, Precision("fp32", "test"), world)
    assert config["zero_optimization"]["stage"] == expected
    assert config["train_batch_size"] == 2 * world


# One gloo rank in a child process (torch.distributed stays out of the test session):
# 10 steps at ZeRO-2 and at ZeRO-1 from the same seed; the ZeRO-2 checkpoint loaded
# into a ZeRO-1 engine; 5 more steps on each.
_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, tempfile
    import torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    from cohortcast.config.models import ForecasterConfig, VAEConfig
    from cohortcast.config.training import StageConfig
    from cohortcast.models.schedulers import train_scheduler
    from cohortcast.training.deepspeed_setup import Precision, seed_everything
    from cohortcast.training.ldm_stage import build_denoiser, unconditional_loss
    import cohortcast.training.deepspeed_setup as setup

    cfg = ForecasterConfig(vae=VAEConfig(sample_size=32))
    scheduler = train_scheduler(cfg.scheduler)

    def engine(zero):
        seed_everything(1)
        model = build_denoiser(cfg)
        stage = StageConfig(max_steps=100, micro_batch_size=4, lr=1e-3, warmup_steps=1, zero_stage=zero)
        optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
        config = setup.deepspeed_config(stage, Precision("fp32", "test"), 2)  # 2: keep the requested stage
        config["train_batch_size"] = stage.micro_batch_size
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]

    def train(e, steps, seed):
        torch.manual_seed(seed)
        side = cfg.vae.latent_side
        for x in torch.randn(steps, 4, cfg.vae.latent_channels, side, side):
            e.backward(unconditional_loss(e, scheduler, x))
            e.step()

    def flat(e):
        return torch.cat([p.detach().flatten() for p in e.module.parameters()])

    zero2, zero1 = engine(2), engine(1)
    train(zero2, 10, 0)
    train(zero1, 10, 0)
    out = {"after_10": (flat(zero2) - flat(zero1)).abs().max().item()}
    folder = tempfile.mkdtemp()
    zero2.save_checkpoint(folder, tag="t")
    resumed = engine(1)
    resumed.load_checkpoint(folder, tag="t")
    out["loaded"] = (flat(resumed) - flat(zero2)).abs().max().item()
    out["loaded_steps"] = resumed.global_steps
    train(zero2, 5, 1)
    train(resumed, 5, 1)
    out["after_15"] = (flat(zero2) - flat(resumed)).abs().max().item()
    out["moved"] = (flat(zero2) - flat(zero1)).abs().max().item()
    print("RESULT " + json.dumps(out))
    """
)


def test_zero2_and_zero1_agree_on_one_rank_and_share_checkpoints():
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(free_port())], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["after_10"] == 0.0  # bitwise: the same math, only the bookkeeping differs
    assert result["loaded"] == 0.0 and result["loaded_steps"] == 10
    assert result["after_15"] == 0.0  # the optimizer state (Adam moments) came back too
    assert result["moved"] > 0.0  # the 5 extra steps changed the weights: the comparison can fail

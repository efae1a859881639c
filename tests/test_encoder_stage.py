"""The CLDM encoder stage's pieces without Ray: each step pairs a volume batch and a
radiograph batch of their own sizes (the shorter stream restarting), validation's MIM
losses and reconstruction grids, the stage's config, the job's stage names and input
checks. tests/test_cldm_job.py runs the stage itself on Ray Train + DeepSpeed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cohortcast.config import ConfigError, load_config
from cohortcast.config.cldm import CLDM_STAGES, EncoderConfig, EncoderStageConfig
from cohortcast.config.training import ScalingSettings
from cohortcast.pipeline.cldm import CLDMOutputs, CLDMReport, check_ingested_shapes, format_report
from cohortcast.training.encoder_stage import PairedBatches, mean_patch_baseline, validate_encoder
from cohortcast.training.stage_runner import StageNotAvailable, StageReport, StageRunner

TINY = dict(dim=32, depth=1, heads=2, decoder_dim=16, decoder_heads=2, patch_2d=(4, 4), patch_3d=(2, 4, 4))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is faster on 2 shared cores."""


class FakeShard:
    """What PairedBatches reads from a Ray Data shard: numbered rows {"image": ...}."""

    def __init__(self, rows: int, shape: tuple[int, ...]):
        self.images = np.stack([np.full(shape, i, np.float32) for i in range(rows)])
        self.passes = 0

    def iter_batches(self, batch_size, drop_last, batch_format):
        assert drop_last and batch_format == "numpy"
        self.passes += 1
        for start in range(0, len(self.images) - batch_size + 1, batch_size):
            yield {"image": self.images[start : start + batch_size]}


def _ids(images: torch.Tensor) -> list[int]:
    return [int(v) for v in images.flatten(1)[:, 0]]


def test_each_step_pairs_a_volume_batch_and_a_radiograph_batch_of_their_own_sizes():
    volumes, radiographs = FakeShard(7, (2, 4, 4)), FakeShard(5, (4, 4))
    paired = PairedBatches({3: volumes, 2: radiographs}, {3: 2, 2: 4})
    first, second = list(paired.epoch()), list(paired.epoch())
    # An epoch is one pass over the volumes (7 rows, batches of 2, the last row dropped).
    assert len(first) == len(second) == 3 and volumes.passes == 2
    for step in first + second:
        assert step["image_3d"].shape == (2, 1, 2, 4, 4) and step["image_3d"].dtype == torch.float32
        assert step["image_2d"].shape == (4, 1, 4, 4)
    assert [_ids(s["image_3d"]) for s in first] == [[0, 1], [2, 3], [4, 5]]
    # The radiographs (one batch of 4 per pass) restart whenever they run out and carry
    # on across epochs: every step still gets a full batch.
    assert all(_ids(s["image_2d"]) == [0, 1, 2, 3] for s in first + second)
    assert radiographs.passes == 6


def test_one_kind_alone_and_an_empty_stream_is_an_error():
    only_2d = PairedBatches({2: FakeShard(4, (4, 4))}, {2: 2})
    assert [sorted(s) for s in only_2d.epoch()] == [["image_2d"], ["image_2d"]]
    starved = PairedBatches({3: FakeShard(4, (2, 4, 4)), 2: FakeShard(1, (4, 4))}, {3: 2, 2: 2})
    with pytest.raises(RuntimeError, match="no full batch of 2 radiographs"):
        list(starved.epoch())


class Engine:
    """The stage loop hands validation a DeepSpeed engine; validation reads `.module`."""

    def __init__(self, module):
        self.module = module


def test_validation_reports_each_kinds_loss_their_weighted_sum_and_grids():
    from cohortcast.models.universal_encoder import UniversalEncoder

    torch.manual_seed(0)
    engine = Engine(UniversalEncoder(EncoderConfig(**TINY)).eval())
    rng = np.random.default_rng(0)
    batches = [
        {"image_3d": rng.uniform(-1, 1, (3, 4, 8, 8)).astype(np.float32)},
        {"image_3d": rng.uniform(-1, 1, (2, 4, 8, 8)).astype(np.float32)},
        {"image_2d": rng.uniform(-1, 1, (4, 8, 8)).astype(np.float32)},
    ]
    with torch.no_grad():
        metrics, grids = validate_encoder(engine, batches, {3: 1.0, 2: 0.5}, cases=2, seed=5)
        again, _ = validate_encoder(engine, batches, {3: 1.0, 2: 0.5}, cases=2, seed=5)
    assert metrics == again  # the validation masks come from the seed: comparable across steps
    assert set(metrics) == {"mim_3d", "mim_2d", "mim", "mim_3d_baseline", "mim_2d_baseline"}
    assert all(np.isfinite(list(metrics.values())))
    assert metrics["mim"] == pytest.approx(metrics["mim_3d"] + 0.5 * metrics["mim_2d"])
    # Predicting each patch's mean scores (n - 1) / n on per-patch normalised targets
    # (unbiased variance) for noise patches of n pixels, and 0 on flat ones.
    assert metrics["mim_3d_baseline"] == pytest.approx(31 / 32, rel=1e-4)  # 2 x 4 x 4 patches
    assert metrics["mim_2d_baseline"] == pytest.approx(15 / 16, rel=1e-4)  # 4 x 4 patches
    assert mean_patch_baseline(engine.module, torch.zeros(2, 1, 8, 8)) == 0.0
    # masked input | reconstruction | original, 2 cases each; volumes by their middle slice
    assert grids["reconstruction_3d"].shape == (2 * 8 + 2, 3 * 8 + 4)
    assert grids["reconstruction_2d"].shape == (2 * 8 + 2, 3 * 8 + 4)
    assert grids["reconstruction_2d"].dtype == np.uint8


def test_encoder_stage_config_batch_sizes_and_weights():
    cfg = load_config(
        None,
        [
            "cldm.training.encoder.micro_batch_3d=2",
            "cldm.training.encoder.micro_batch_2d=16",
            "cldm.training.encoder.weight_2d=0.5",
        ],
    )
    stage = cfg.cldm.training.encoder
    assert isinstance(stage, EncoderStageConfig) and (stage.micro_batch_3d, stage.micro_batch_2d) == (2, 16)
    assert cfg.cldm.training.stages == CLDM_STAGES
    assert CLDM_STAGES == ("encoder", "study_latents", "segmentation", "report", "diffusion", "regressor")
    for bad, message in (
        ("cldm.training.encoder.micro_batch_size=8", "micro_batch_size"),
        ("cldm.training.encoder.weight_3d=-1", "weight_3d"),
        ("cldm.training.stages=[encoder,vae]", "stages"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="micro_batch_3d"):
        load_config(None, ["cldm.training.encoder.micro_batch_3d=0", "cldm.training.encoder.micro_batch_2d=0"])


class Runs:
    """The parts of tracking.job_runs.JobRuns a stage runner calls, with MLflow off."""

    def __init__(self):
        self.failed = []

    def start_child(self, name, params):
        return name

    def fail_child(self, run_id):
        self.failed.append(run_id)


def test_a_cldm_stage_left_out_of_the_stages_needs_a_finished_output(tmp_path):
    runner = StageRunner(
        tmp_path, ScalingSettings(), ("study_latents",), known=CLDM_STAGES, stages_setting="cldm.training.stages"
    )
    runs = Runs()
    with pytest.raises(StageNotAvailable, match="'encoder' is not in cldm.training.stages"):
        runner.train(runs, "encoder", "k", None, {}, dict, None, {})
    assert runs.failed == ["encoder"]


def test_ingested_shapes_must_tile_into_the_patches_and_be_the_encoders_sizes():
    encoder = EncoderConfig(patch_2d=(8, 8), patch_3d=(4, 8, 8))
    check_ingested_shapes(encoder, {"tables": {"studies": {"volume": [16, 32, 32], "radiograph": [64, 64]}}})
    with pytest.raises(ConfigError, match=r"ingest.volume_shape.*\[10, 32, 32\].*cldm.encoder.patch_3d"):
        check_ingested_shapes(encoder, {"tables": {"studies": {"volume": [10, 32, 32]}}})
    with pytest.raises(ConfigError, match="ingest.radiograph_size"):
        check_ingested_shapes(encoder, {"tables": {"studies": {"radiograph": [60, 60]}}})
    with pytest.raises(
        ConfigError, match=r"ingest.volume_shape.*\[8, 16, 16\].*cldm.encoder.volume_3d is \[16, 32, 32\]"
    ):
        check_ingested_shapes(encoder, {"tables": {"studies": {"volume": [8, 16, 16]}}})
    with pytest.raises(ConfigError, match=r"cldm.encoder.image_2d"):
        check_ingested_shapes(encoder, {"tables": {"studies": {"radiograph": [32, 32]}}})


def test_job_summary_lists_the_stages_and_outputs():
    text = format_report(
        CLDMReport(
            [
                StageReport("encoder", "trained", "/e", 30.0, 1.25, 0.5, {"val/mim_3d": 0.75}),
                StageReport("study_latents", "built", "/l", 5.0, metrics={"rows": 12}),
            ],
            CLDMOutputs(Path("/e"), Path("/l")),
            "MLflow: here",
            "r1",
        )
    )
    lines = text.splitlines()
    assert lines[0].startswith("CLDM job summary")
    assert any(line.startswith("encoder ") and "1.2500 -> 0.5000" in line for line in lines)
    assert any(line.startswith("study_latents built") for line in lines)
    assert "mim_3d 0.7500" in text and "Encoder: /e" in text and "Latents: /l" in text

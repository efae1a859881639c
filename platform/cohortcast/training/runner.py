"""Build and run a Ray Train TorchTrainer for one stage. Re-running with the same
storage path and name resumes from the stage's latest checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cohortcast.config.training import ScalingSettings


def run_stage(
    name: str,
    worker_loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    datasets: dict,
    scaling: ScalingSettings,
    callbacks: list | None = None,
):
    """`datasets`: "train" and any "train_*" (a stage drawing from several, e.g. the CLDM
    encoder's "train_3d" and "train_2d") are sharded across workers (`get_dataset_shard`);
    any other (e.g. "val", read by rank 0 only) reaches each worker whole. None values are dropped.
    `callbacks`: Train callbacks, e.g. Tune's TuneReportCallback inside a sweep trial."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    datasets = {k: v for k, v in datasets.items() if v is not None}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[k for k in datasets if k == "train" or k.startswith("train_")]),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(scaling.storage_path).resolve()),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=scaling.checkpoints_to_keep),
        ),
    )
    return trainer.fit()

"""Build and run a Ray Train TorchTrainer for one stage. Re-running with the same
storage path and name resumes from the stage's latest checkpoint."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cohortcast.config.training import ScalingSettings


def is_uri(path: str) -> bool:
    """`s3://bucket/x`, `gs://...`, `file:///...`: storage pyarrow opens, not a local path."""
    return "://" in str(path)


def storage_location(path: str) -> str:
    """Ray Train's `storage_path`: a URI unchanged (Path() would fold `s3://b` into
    `s3:/b` and resolve() prefix it with the current folder), a local path absolute."""
    return str(path) if is_uri(path) else str(Path(os.path.expanduser(path)).resolve())


def run_stage(
    name: str,
    worker_loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    datasets: dict,
    scaling: ScalingSettings,
    callbacks: list | None = None,
    report_every_log: bool | None = None,
):
    """`datasets`: "train" and any "train_*" (a stage drawing from several, e.g. the CLDM
    encoder's "train_3d" and "train_2d") are sharded across workers (`get_dataset_shard`);
    any other (e.g. "val", read by rank 0 only) reaches each worker whole. None values are dropped.
    `callbacks`: Train callbacks, e.g. Tune's TuneReportCallback inside a sweep trial.
    `report_every_log`: whether the workers also report to Ray Train every `log_every`
    steps between checkpoints (default: when there are callbacks to hear them)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cohortcast.training.data_streaming import data_execution_options, worker_cpus
    from cohortcast.training.stage_loop import with_report_policy

    scaling.validate()
    datasets = {k: v for k, v in datasets.items() if v is not None}
    # The datasets stream while the workers train: keep CPUs free for their tasks.
    cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0)) if ray.is_initialized() else 0.0
    per_worker = worker_cpus(scaling, cluster_cpus)
    # Reports between checkpoints only where someone listens: Tune's callback in a trial.
    every_log = bool(callbacks) if report_every_log is None else report_every_log
    loop = functools.partial(with_report_policy, worker_loop, every_log)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=[k for k in datasets if k == "train" or k.startswith("train_")],
            execution_options=data_execution_options(scaling, cluster_cpus, per_worker),
        ),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": per_worker},
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_location(scaling.storage_path),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=scaling.checkpoints_to_keep),
        ),
    )
    return trainer.fit()

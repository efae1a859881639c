"""DeepSpeed checkpoints through Ray Train: every rank writes its shard (ZeRO splits
optimizer state across ranks) into its own temp folder and reports it; Ray Train
gathers the ranks' files into one checkpoint in the run's storage. On restart,
`ray.train.get_checkpoint()` hands the latest one back and every rank loads its shard."""

from __future__ import annotations

import tempfile
from typing import Any

import ray.train
from ray.train import Checkpoint

TAG = "ds"


def save_and_report(engine, metrics: dict[str, Any], client_state: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=TAG, client_state=client_state)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def restore(engine) -> dict[str, Any] | None:
    """Load the latest reported checkpoint into `engine`; returns its client state."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path, client_state = engine.load_checkpoint(folder, tag=TAG)
    if path is None:
        raise RuntimeError(f"checkpoint {checkpoint.path} holds no DeepSpeed state with tag {TAG!r}")
    return client_state

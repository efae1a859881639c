"""Training the ViT malignancy evaluator (NAMD Sec. 4.1.2) on Ray Train + DeepSpeed,
through the same stage loop as the NAMD stages: real follow-up crops of the train split
in 8 orientations, nodule-level labels; validation AUROC on the val split's follow-ups."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cohortcast.config.evaluation import EvaluatorConfig


def followup_labels(folder: str | Path) -> dict[str, float]:
    """{row key: nodule label} for every follow-up row (any exam after the nodule's first)
    with a known label. Reads only the id columns, so it stays small at cohort scale; the
    crops themselves are selected by Ray Data (no shuffle, unlike a groupby)."""
    import pyarrow.parquet as pq

    t = pq.read_table(folder, columns=["patient", "nodule_id", "days_since_baseline", "malignant"]).to_pandas()
    by_nodule = t.groupby(["patient", "nodule_id"])
    first, label = by_nodule["days_since_baseline"].transform("min"), by_nodule["malignant"].transform("max")
    keep = (t["days_since_baseline"] > first) & (label >= 0)
    return {
        _row_key(p, n, d): float(y)
        for p, n, d, y in zip(t["patient"][keep], t["nodule_id"][keep], t["days_since_baseline"][keep], label[keep])
    }


def _row_key(patient, nodule, days) -> str:
    return f"{patient}/{nodule}/{float(days):.1f}"


def dihedral(images: np.ndarray) -> np.ndarray:
    """(B, ..., H, W) -> (8B, ..., H, W): the 4 rotations of each image and of its mirror.
    Malignancy does not depend on orientation; expanding the rows 8x also keeps a small
    cohort's epochs long enough that per-epoch start-up does not dominate."""
    from cohortcast.data.transforms import NUM_ORIENTATIONS, dihedral_orientation

    out = [dihedral_orientation(images, k) for k in range(NUM_ORIENTATIONS)]
    return np.ascontiguousarray(np.concatenate(out))


def select_followups(batch: dict[str, np.ndarray], labels: dict[str, float], augment: bool) -> dict[str, np.ndarray]:
    keys = [_row_key(p, n, d) for p, n, d in zip(batch["patient"], batch["nodule_id"], batch["days_since_baseline"])]
    keep = np.array([k in labels for k in keys], bool)
    images = np.asarray(batch["crop"], np.float32)[keep][:, None]  # (B, 1, H, W)
    y = np.array([labels[k] for k, kept in zip(keys, keep) if kept], np.float32)
    if augment:
        images, y = dihedral(images), np.tile(y, 8)
    return {"image": images, "label": y}


def followup_dataset(ingested: str | Path, split: str, augment: bool = False, data_cpus: float = 0.5):
    """Real follow-up crops of a split (8 orientations each with `augment`), streamed
    while the workers train (training/data_streaming.py), or None when the split holds
    no follow-up."""
    from cohortcast.training.data_streaming import data_task_cpus, stream_parquet

    folder = Path(ingested) / "nodules" / f"split={split}"
    if not folder.is_dir():
        return None
    labels = followup_labels(folder)
    if not labels:
        return None
    return stream_parquet(folder, ["patient", "nodule_id", "days_since_baseline", "crop"], data_cpus).map_batches(
        select_followups,
        fn_kwargs={"labels": labels, "augment": augment},
        batch_format="numpy",
        num_cpus=data_task_cpus(data_cpus),
    )


def validate_evaluator(engine, batches) -> tuple[dict[str, float], dict]:
    import torch
    import torch.nn.functional as F

    from cohortcast.evaluation.metrics import classification_metrics

    device = next(engine.module.parameters()).device
    labels, logits = [], []
    for batch in batches:
        images = torch.from_numpy(np.asarray(batch["image"], np.float32)).to(device)
        logits += engine.module(images).float().cpu().tolist()
        labels += [int(v) for v in batch["label"]]
    if not labels:
        return {}, {}
    bce = F.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor(labels, dtype=torch.float32))
    metrics = {"bce": float(bce)}
    if len(set(labels)) == 2:
        metrics.update(classification_metrics(labels, torch.sigmoid(torch.tensor(logits)).numpy()))
    return metrics, {}


def evaluator_worker_loop(config: dict) -> None:
    """Ray Train `train_loop_per_worker`; config: {"stage", "model": EvaluatorConfig,
    "image_size", "tracking"}."""
    import torch.nn.functional as F

    from cohortcast.models.evaluator import MalignancyEvaluator
    from cohortcast.training.stage_loop import StageHooks, run_stage_loop

    model_cfg: EvaluatorConfig = config["model"]

    def loss_fn(engine, batch):
        logits = engine(batch["image"])
        return {"total": F.binary_cross_entropy_with_logits(logits.float(), batch["label"].float())}

    hooks = StageHooks(
        validate=validate_evaluator,
        tracking=config.get("tracking"),
        validate_every_epochs=model_cfg.validate_every_epochs,
    )
    run_stage_loop(config["stage"], lambda: MalignancyEvaluator.build(model_cfg, config["image_size"]), loss_fn, hooks)

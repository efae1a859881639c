"""Universal-encoder throughput (CLDM part 1): masked-image-modelling pre-training
samples/s for CT volumes (3D) and radiographs (2D), the Ray Train + DeepSpeed stage
(`run_stage` + `encoder_worker_loop`, 1 worker on all cores, ZeRO-2, fp32 on CPU) vs a
plain single-process PyTorch loop with the same model, micro-batches, loss and AdamW;
then study latent cache studies/s (`build_study_latent_cache`, a Ray Data actor pool)
vs the same encoder over the same studies in a plain loop (pyarrow read, batches of
16, one Parquet file per kind). All in one run.

    python benchmarks/encoder_throughput.py [--steps 200] [--batch-3d 2] [--batch-2d 8]
        [--volume 32 64 64] [--radiograph 64] [--studies 256] [--flavor debug]

Each Ray stage trains one kind alone (the other's micro-batch 0), so its samples/s is
that kind's; "mixed" trains both in every step (samples = both batches). "loop"
samples/s is measured inside the training loop (the job's `samples_per_s`: from the
first step's start, so it includes the data shard's first batch, but not Ray Train's
and DeepSpeed's set-up); "incl. start-up" is the wall clock of `fit()`. The plain loop
slices batches from a tensor in memory (no data pipeline). Random smooth images of the
cldm_debug.yaml sizes. Record the output in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def smooth(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """Coarse noise upsampled: structure a masked patch's neighbours predict, in [-1, 1]."""
    coarse = torch.from_numpy(rng.uniform(-1, 1, (n, 1, *[max(s // 4, 1) for s in shape])).astype(np.float32))
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(coarse, size=shape, mode=mode, align_corners=False)[:, 0].numpy()


def plain_loop(encoder_cfg, steps: int, batch: int, images: np.ndarray, deepspeed_zero: int | None = None) -> float:
    """Batches sliced from a tensor in memory. `deepspeed_zero`: the same steps through a
    DeepSpeed engine (the stage's config, one process, no Ray): what DeepSpeed alone costs."""
    from cohortcast.models.universal_encoder import UniversalEncoder
    from cohortcast.training.deepspeed_setup import seed_everything

    seed_everything(23)
    model = UniversalEncoder(encoder_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    data = torch.from_numpy(images)[:, None]
    if deepspeed_zero is None:

        def step(rows):
            loss = model.mim_loss(rows)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    else:
        import deepspeed
        import torch.distributed as dist

        from cohortcast.config.training import StageConfig
        from cohortcast.training.deepspeed_setup import choose_precision, deepspeed_config

        if not dist.is_initialized():  # a one-process group, as a Ray Train worker of one has
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0")
            os.environ["WORLD_SIZE"] = "1"
            dist.init_process_group("gloo", rank=0, world_size=1)
        stage = StageConfig(max_steps=steps, micro_batch_size=batch, lr=1e-4, warmup_steps=1, zero_stage=deepspeed_zero)
        config = deepspeed_config(stage, choose_precision("fp32", torch.device("cpu")), 1)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

        def step(rows):
            engine.backward(engine(rows))
            engine.step()

    started = time.perf_counter()
    for i in range(steps):
        step(data[(i * batch) % (len(data) - batch + 1) :][:batch])
    return steps * batch / (time.perf_counter() - started)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_path(encoder_cfg, steps: int, batches: dict[int, int], images: dict[int, np.ndarray], storage: str):
    import ray.data

    from cohortcast.config.cldm import EncoderStageConfig, EncoderValidationConfig
    from cohortcast.config.training import ScalingSettings
    from cohortcast.training.encoder_stage import encoder_worker_loop
    from cohortcast.training.runner import run_stage

    stage = EncoderStageConfig(
        max_steps=steps,
        micro_batch_3d=batches.get(3, 0),
        micro_batch_2d=batches.get(2, 0),
        lr=1e-4,
        warmup_steps=1,
        zero_stage=2,
        checkpoint_every=10**6,
        log_every=steps,
    )
    datasets = {
        f"train_{d}d": ray.data.from_items([{"image": x} for x in images[d]]).materialize()
        for d in batches
        if batches[d]
    }
    started = time.perf_counter()
    result = run_stage(
        f"bench-encoder-{'-'.join(f'{d}d' for d in datasets)}-{time.time_ns()}",
        encoder_worker_loop,
        {"stage": stage, "model": encoder_cfg, "validation": EncoderValidationConfig()},
        datasets,
        ScalingSettings(num_workers=1, cpus_per_worker=os.cpu_count(), storage_path=storage, max_failures=0),
    )
    wall = time.perf_counter() - started
    return float(result.metrics["samples_per_s"]), steps * sum(batches.values()) / wall


def plain_cache(ingested: Path, encoder_folder: Path, out: Path, batch_size: int = 16) -> int:
    """The study latent cache's work without Ray: read the studies table (pyarrow), the
    frozen encoder over each kind in batches, one Parquet file of [CLS] + tokens per kind."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from cohortcast.inference.study_latent_cache import IMAGE_COLUMN, StudyTokenEncoder

    table = pads.dataset(str(ingested / "studies"), format="parquet", partitioning="hive")
    done = 0
    for dims, column in IMAGE_COLUMN.items():
        actor = StudyTokenEncoder(str(encoder_folder), dims)
        rows = table.to_table(columns=["study", column], filter=pads.field("dims") == dims)
        images = rows.column(column).combine_chunks().to_numpy_ndarray()
        parts = []
        for start in range(0, len(images), batch_size):
            batch = {
                "study": np.asarray(rows.column("study")[start : start + batch_size]),
                column: images[start:][:batch_size],
            }
            encoded = actor(batch)
            parts.append(
                pa.table(
                    {
                        "study": encoded["study"],
                        "cls": list(encoded["cls"]),
                        "tokens": [t.ravel() for t in encoded["tokens"]],
                    }
                )
            )
        pq.write_table(pa.concat_tables(parts), out / f"dims={dims}.parquet")
        done += len(images)
    return done


def cache_rates(encoder_cfg, volumes: np.ndarray, radiographs: np.ndarray, root: Path, actors: int):
    """(Ray Data actor pool studies/s incl. start-up, plain loop studies/s): the same
    studies read from the same Parquet table, encoded and written as Parquet."""
    import ray.data

    from cohortcast.inference.study_latent_cache import build_study_latent_cache
    from cohortcast.models.universal_encoder import UniversalEncoder

    torch.manual_seed(0)
    UniversalEncoder(encoder_cfg).save(root / "encoder")
    rows = [
        {
            "patient": f"p{i}",
            "study": f"s{i}-{d}",
            "split": "train",
            "dims": np.int8(d),
            "modality": m,
            "volume": v,
            "radiograph": r,
        }
        for i in range(len(volumes))
        for d, m, v, r in (
            (3, "CT", volumes[i], np.zeros_like(radiographs[0])),
            (2, "DX", np.zeros_like(volumes[0]), radiographs[i]),
        )
    ]
    # a few large files, as ingestion writes them (from_items alone makes one block per few rows)
    ray.data.from_items(rows, override_num_blocks=4).write_parquet(
        str(root / "ingested" / "studies"), partition_cols=["split"]
    )
    (root / "ingested" / "card.json").write_text(json.dumps({"fingerprint": "bench"}))
    started = time.perf_counter()
    card = build_study_latent_cache(root / "ingested", root / "encoder", root / "cache", actors=actors, batch_size=16)
    ray_rate = len(rows) / (time.perf_counter() - started)
    assert sum(card["rows"].values()) == len(rows)
    (root / "plain").mkdir()
    started = time.perf_counter()
    assert plain_cache(root / "ingested", root / "encoder", root / "plain") == len(rows)
    return ray_rate, len(rows) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-3d", type=int, default=2)
    parser.add_argument("--batch-2d", type=int, default=8)
    parser.add_argument("--volume", type=int, nargs=3, default=[32, 64, 64])
    parser.add_argument("--radiograph", type=int, default=64)
    parser.add_argument("--studies", type=int, default=256, help="studies of each kind (training data, latent cache)")
    parser.add_argument("--flavor", default="debug", help="cldm.encoder flavour (debug: CPU size)")
    args = parser.parse_args()
    import ray

    from cohortcast.config.cldm import encoder_flavor

    encoder_cfg = encoder_flavor(args.flavor)
    encoder_cfg.volume_3d, encoder_cfg.image_2d = tuple(args.volume), (args.radiograph, args.radiograph)
    rng = np.random.default_rng(0)
    n = max(args.studies, 2 * max(args.batch_3d, args.batch_2d))
    images = {3: smooth(rng, n, tuple(args.volume)), 2: smooth(rng, n, (args.radiograph, args.radiograph))}
    batches = {3: args.batch_3d, 2: args.batch_2d}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = {}
    for d in (3, 2):
        rows[f"{d}D plain loop ({torch.get_num_threads()} torch threads)"] = (
            plain_loop(encoder_cfg, args.steps, batches[d], images[d]),
            None,
        )
        rows[f"{d}D plain loop + DeepSpeed ZeRO-2 engine, no Ray"] = (
            plain_loop(encoder_cfg, args.steps, batches[d], images[d], deepspeed_zero=2),
            None,
        )
    with tempfile.TemporaryDirectory() as tmp:
        for d in (3, 2):
            rows[f"{d}D Ray Train + DeepSpeed ZeRO-2, 1w x {os.cpu_count()} CPU"] = ray_path(
                encoder_cfg, args.steps, {d: batches[d]}, images, tmp
            )
        rows["3D+2D mixed steps, Ray Train + DeepSpeed"] = ray_path(encoder_cfg, args.steps, batches, images, tmp)
        cache_ray, cache_plain = cache_rates(
            encoder_cfg, images[3][: args.studies], images[2][: args.studies], Path(tmp), actors=1
        )
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
                f"torch {torch.__version__}, Ray {ray.__version__}",
                "encoder": {"flavor": args.flavor, "dim": encoder_cfg.dim, "depth": encoder_cfg.depth},
                "steps": args.steps,
                "micro_batch": {"3d": args.batch_3d, "2d": args.batch_2d},
                "volume": args.volume,
                "radiograph": args.radiograph,
            }
        )
    )
    print(f"{'path':<50} {'samples/s (loop)':>17} {'samples/s (incl. start-up)':>27}")
    for name, (loop_rate, wall_rate) in rows.items():
        wall = f"{wall_rate:.1f}" if wall_rate is not None else "-"
        print(f"{name:<50} {loop_rate:>17.1f} {wall:>27}")
    for d in (3, 2):
        plain = next(v[0] for k, v in rows.items() if k.startswith(f"{d}D plain"))
        ray_rate = next(v[0] for k, v in rows.items() if k.startswith(f"{d}D Ray"))
        print(f"{d}D Ray Train + DeepSpeed / plain loop: {ray_rate / plain:.2f}x")
    print(
        f"study latent cache, {2 * args.studies} studies: Ray Data actor pool (1 actor, incl. start-up) "
        f"{cache_ray:.1f} studies/s; plain loop {cache_plain:.1f} studies/s ({cache_ray / cache_plain:.2f}x)"
    )


if __name__ == "__main__":
    main()

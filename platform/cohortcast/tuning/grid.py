"""The sweep's grid as configs: one validated CohortcastConfig per grid point, the
upstream each point needs (its job's shared stages, tuning/jobs.py), readable trial
names, and how many trials the cluster runs at once."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any

from cohortcast.config import ConfigError, from_dict, to_dict
from cohortcast.config.schema import CohortcastConfig


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, in Tune's grid order (the last key varies slowest)."""
    keys = list(grid)
    combos = itertools.product(*(grid[k] for k in reversed(keys)))
    return [dict(zip(keys, reversed(values))) for values in combos]


def with_values(cfg: CohortcastConfig, values: dict[str, Any]) -> CohortcastConfig:
    """A copy of `cfg` with dotted keys set, validated; a wrong key or value is a
    ConfigError naming it (`tune.grid.<key>`)."""
    data = to_dict(cfg)
    for dotted, value in values.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"tune.grid.{dotted}: {part!r} is not a config section")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"tune.grid.{dotted}: no such config key")
        node[leaf] = value
    try:
        return from_dict(CohortcastConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"tune.grid: {exc}") from None


def trial_name(values: dict[str, Any]) -> str:
    """`task_weight=0.5,tau_f=1.0`: each key by its last part, or its last two when the
    last part alone would be ambiguous (training.vae.lr vs training.ldm_cond.lr)."""
    lasts = [k.rsplit(".", 1)[-1] for k in values]
    parts = []
    for key, last in zip(values, lasts):
        name = last if lasts.count(last) == 1 else ".".join(key.split(".")[-2:])
        parts.append(f"{name}={values[key]}")
    return ",".join(parts)


def upstream_key(cfg: CohortcastConfig) -> str:
    """What the job's shared stages depend on besides the cohort (tuning/jobs.py): trials
    with equal keys share one upstream (NAMD: VAE, latent cache, unconditional LDM; CLDM:
    encoder, study latent cache, decoders), so a lambda-only grid trains each once."""
    from cohortcast.tuning.jobs import sweep_job

    return sweep_job(cfg).upstream_key(cfg)


def upstream_config(cfg: CohortcastConfig) -> CohortcastConfig:
    """The config that trains a trial's upstream, into `<tune.output>/shared/<key>`."""
    from cohortcast.tuning.jobs import sweep_job

    job = sweep_job(cfg)
    out = copy.deepcopy(cfg)
    job.set_output(out, str(Path(cfg.tune.output) / "shared" / upstream_key(cfg)))
    return job.upstream_config(out)


def trial_config(base: CohortcastConfig, values: dict[str, Any]) -> CohortcastConfig:
    """A grid point's config; its trial stage writes to `<tune.output>/trials/<name>`
    (`training.output` for NAMD, `cldm.training.output` for CLDM)."""
    from cohortcast.tuning.jobs import sweep_job

    cfg = with_values(base, values)
    sweep_job(cfg).set_output(cfg, str(Path(base.tune.output) / "trials" / trial_name(values)))
    cfg.run_name = f"{base.run_name}:{trial_name(values)}"
    return cfg


def concurrent_trials(cfg: CohortcastConfig, resources: dict[str, float]) -> int:
    """`tune.max_concurrent_trials`, or as many trials as the cluster's CPUs (GPUs when
    training on GPUs) hold, each needing its Ray Train workers' share."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    scaling = cfg.training.scaling
    if scaling.use_gpu:
        need, have = scaling.num_workers, resources.get("GPU", 0.0)
    else:
        need, have = scaling.num_workers * scaling.cpus_per_worker, resources.get("CPU", 0.0)
    return max(1, int(have // need))


def trials_base(cfg: CohortcastConfig, concurrency: int, resources: dict[str, float]) -> CohortcastConfig:
    """The base config the trials run from: a copy whose Ray Train workers leave
    `training.scaling.data_cpus` free when `concurrency` trials run at once, as one stage
    alone does (training/data_streaming.py): each trial's datasets stream while every
    trial's workers hold their CPUs."""
    from cohortcast.training.data_streaming import worker_cpus

    out = copy.deepcopy(cfg)
    scaling = out.training.scaling
    together = dataclasses.replace(scaling, num_workers=scaling.num_workers * concurrency)
    scaling.cpus_per_worker = worker_cpus(together, resources.get("CPU", 0.0))
    return out

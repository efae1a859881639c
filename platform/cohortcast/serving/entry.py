"""Entry points that build the Serve application from a cohortcast config: the
`cohortcast serve` command and the application builder a Serve config file names
(`import_path: cohortcast.serving.entry:app_builder`, see cluster/serve_config.yaml)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _token(serve) -> str | None:
    """The bearer token from the variable `serve.auth_token_env` names (ConfigError if unset)."""
    from cohortcast.config import ConfigError

    if not serve.auth_token_env:
        return None
    token = os.environ.get(serve.auth_token_env)
    if not token:
        raise ConfigError(f"serve.auth_token_env names {serve.auth_token_env!r}, which is not set")
    return token


def application(cfg):
    """Config (paths resolved here) -> the Serve application; the bearer token is read
    from the environment variable `serve.auth_token_env` names."""
    from cohortcast.config.paths import resolve_paths
    from cohortcast.serving.app import build_app

    cfg = resolve_paths(cfg)
    return build_app(cfg.serve, llm_path=cfg.model.conditioner.llm_path, token=_token(cfg.serve), ingest=cfg.ingest)


def check_before_start(cfg) -> None:
    """What `cohortcast serve` checks before starting Ray, so a user error is one line
    (ConfigError) instead of a replica's traceback: the token variable is set, a local
    serve.forecaster / serve.evaluator is a folder, a serve.cldm_model holds encoder/
    and diffusion/, every serve.cohort_roots entry an
    existing folder. (A Serve config file builds the app on the cluster, where these
    paths live: there Serve reports them.)"""
    from cohortcast.config import ConfigError
    from cohortcast.config.paths import _is_uri, resolve_paths

    serve = resolve_paths(cfg).serve
    _token(serve)
    if not _is_uri(serve.forecaster) and not Path(serve.forecaster).is_dir():
        raise ConfigError(
            f"serve.forecaster: {serve.forecaster} is neither a Forecaster folder nor an MLflow "
            "model URI (models:/name/version, runs:/id/forecaster)"
        )
    if serve.evaluator and not Path(serve.evaluator).is_dir():
        raise ConfigError(f"serve.evaluator: {serve.evaluator} is not an evaluator folder")
    if serve.cldm_model:
        missing = [part for part in ("encoder", "diffusion") if not (Path(serve.cldm_model) / part).is_dir()]
        if missing:
            raise ConfigError(
                f"serve.cldm_model: {serve.cldm_model} is not a CLDM training output (no {'/, '.join(missing)}/)"
            )
    for i, root in enumerate(serve.cohort_roots):
        if not Path(root).is_dir():
            raise ConfigError(f"serve.cohort_roots[{i}]: {root} is not a folder")


def app_builder(args: dict[str, Any]):
    """Serve config `args`: {"config": "jobs/configs/x.yaml", "set": ["serve.max_samples=8", ...]}."""
    from cohortcast.config import load_config

    return application(load_config(args.get("config"), list(args.get("set", []))))

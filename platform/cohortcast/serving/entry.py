"""Entry points that build the Serve application from a cohortcast config: the
`cohortcast serve` command and the application builder a Serve config file names
(`import_path: cohortcast.serving.entry:app_builder`, see cluster/serve_config.yaml)."""

from __future__ import annotations

import os
from typing import Any


def application(cfg):
    """Config (paths resolved here) -> the Serve application; the bearer token is read
    from the environment variable `serve.auth_token_env` names."""
    from cohortcast.config.paths import resolve_paths
    from cohortcast.serving.app import build_app

    cfg = resolve_paths(cfg)
    token = None
    if cfg.serve.auth_token_env:
        token = os.environ.get(cfg.serve.auth_token_env)
        if not token:
            raise ValueError(f"serve.auth_token_env names {cfg.serve.auth_token_env!r}, which is not set")
    return build_app(cfg.serve, llm_path=cfg.model.conditioner.llm_path, token=token, ingest=cfg.ingest)


def app_builder(args: dict[str, Any]):
    """Serve config `args`: {"config": "jobs/configs/x.yaml", "set": ["serve.max_samples=8", ...]}."""
    from cohortcast.config import load_config

    return application(load_config(args.get("config"), list(args.get("set", []))))

"""Connecting to Ray: one place decides local vs cluster, and says which."""

from __future__ import annotations

import logging

from cohortcast.config import RayConfig

log = logging.getLogger(__name__)


def ensure_ray(cfg: RayConfig | None = None, dashboard: bool = False) -> str | None:
    """Join the running Ray instance if this process has one (tests, `ray job submit`),
    else connect to `cfg.address`, else start a local instance: with its dashboard when
    `dashboard` (it hosts the job server that Ray's JobSubmissionClient talks to).
    Returns the dashboard's http:// address when known."""
    import os

    import ray

    if ray.is_initialized():
        return None
    cfg = cfg or RayConfig()
    kwargs = {"include_dashboard": False, "log_to_driver": True}
    # Under `ray job submit` RAY_ADDRESS names the cluster: join it (sizing it is not ours).
    # address "local" always starts a new instance (never joins one found on this machine).
    joining = cfg.address not in (None, "local") or bool(os.environ.get("RAY_ADDRESS"))
    if not joining:
        kwargs["include_dashboard"] = dashboard
        if cfg.num_cpus is not None:
            kwargs["num_cpus"] = cfg.num_cpus
    context = ray.init(address=cfg.address, **kwargs)
    log.info(
        "Ray: %s with %s", cfg.address or os.environ.get("RAY_ADDRESS") or "local instance", ray.cluster_resources()
    )
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url else None

"""Model errors, importable without torch (the CLI catches them)."""

from cohortcast.errors import CohortcastError


class ForecasterLoadError(CohortcastError, ValueError):
    """A folder that is not a loadable Forecaster (missing files, version, shapes, LLM).
    To a service it means its model, not the request, is at fault."""

    http_status = 503

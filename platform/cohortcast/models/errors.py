"""Model errors, importable without torch (the CLI catches them)."""


class ForecasterLoadError(ValueError):
    """A folder that is not a loadable Forecaster (missing files, version, shapes, LLM)."""

"""Model errors, importable without torch (the CLI catches them)."""

from cohortcast.errors import CohortcastError


class ForecasterLoadError(CohortcastError, ValueError):
    """A folder that is not a loadable Forecaster (missing files, version, shapes, LLM).
    To a service it means its model, not the request, is at fault."""

    http_status = 503


class EncoderInputError(CohortcastError, ValueError):
    """An image or volume the universal encoder cannot take (rank, channels, or a size
    that is not a multiple of the patch); the message names the expected shape."""


class PretrainedWeightsError(CohortcastError, ValueError):
    """Local weights that do not fit the model they are loaded into: missing, unexpected
    or wrongly shaped keys, or a saved config whose architecture differs."""

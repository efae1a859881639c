"""One error model: `CohortcastError` is the base of every error whose message is meant
for the person running cohortcast (a bad config, manifest or study, a missing input, a
stage not trained yet, settings that do not match, ...).

How they surface:
- the `cohortcast` command and `jobs/*.py`: `error: <message>` on stderr, exit status 2,
  no traceback (cohortcast.job_entry);
- the API: status `http_status`, body {"error": user_message, "field": field}
  (cohortcast.serving.app). An error raised while answering a request must therefore
  name no server path: the serving code words its own errors (RequestError) so.

Each sub-package defines its errors next to the code that raises them and derives them
from CohortcastError, keeping the built-in base its callers catch (ConfigError is still a
ValueError). This module imports nothing from cohortcast, so every package may import it.
"""

from __future__ import annotations


class CohortcastError(Exception):
    """An error the user can act on. Subclasses set `http_status` where 400 does not fit."""

    http_status: int = 400  # what the API answers with
    field: str | None = None  # the request field at fault, where there is one

    @property
    def user_message(self) -> str:
        """The text the user reads (the API's "error"; the CLI prints str(exc), the same
        text except where a subclass adds the field to it)."""
        return str(self)


class MissingInputError(CohortcastError, FileNotFoundError):
    """A file or folder the config names does not exist (or is not what it should be).
    Still a FileNotFoundError for callers that catch that."""

    http_status = 404


class OutputExistsError(CohortcastError, FileExistsError):
    """An output that is there already and may only be replaced on request (overwrite)."""

    http_status = 409


# What the CLI and jobs report as one line with exit status 2. Besides our own errors:
# the OS and libraries (open(), pyarrow, safetensors) raise FileNotFoundError and
# FileExistsError for a path the user named, at call sites too many to wrap one by one,
# and their message names that path; the command line reported them this way before
# CohortcastError existed, so they stay here rather than becoming tracebacks.
USER_ERRORS: tuple[type[BaseException], ...] = (CohortcastError, FileNotFoundError, FileExistsError)

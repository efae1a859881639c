"""Keyed-hash pseudonyms: HMAC-SHA256(secret, identifier), truncated.

Without the secret nobody can recompute a pseudonym from a known MRN (a plain hash
could be reversed by hashing candidate MRNs); with it, the same site id maps to the
same pseudonym in every run, so caches and splits stay stable.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

from cohortcast.config import PrivacyConfig
from cohortcast.errors import CohortcastError

log = logging.getLogger(__name__)

# For synthetic data and tests only; a warning says so whenever it is used.
DEVELOPMENT_SECRET = "cohortcast-development-secret-not-for-patient-data"


class MissingSecretError(CohortcastError, RuntimeError):
    """privacy.require_secret without a secret: the deployment, not a request, is at fault."""

    http_status = 503


def resolve_secret(cfg: PrivacyConfig) -> str:
    secret = os.environ.get(cfg.secret_env) or cfg.secret
    if secret:
        return secret
    if cfg.require_secret:
        raise MissingSecretError(
            f"privacy.require_secret is set but neither ${cfg.secret_env} nor privacy.secret is given"
        )
    log.warning(
        "No pseudonym secret (set $%s): using the development secret; do not use it for real patient data",
        cfg.secret_env,
    )
    return DEVELOPMENT_SECRET


class Pseudonymizer:
    """Callable mapping identifiers to pseudonyms; picklable for Ray workers."""

    def __init__(self, secret: str, length: int = 16, prefix: str = "sub-"):
        self._key = secret.encode()
        self.length = length
        self.prefix = prefix

    @classmethod
    def from_config(cls, cfg: PrivacyConfig) -> Pseudonymizer:
        return cls(resolve_secret(cfg), cfg.pseudonym_length)

    def __call__(self, identifier: str, kind: str = "patient") -> str:
        # `kind` separates namespaces: a study id equal to some patient id still
        # gets a different pseudonym.
        mac = hmac.new(self._key, f"{kind}:{identifier}".encode(), hashlib.sha256).hexdigest()
        prefix = self.prefix if kind == "patient" else f"{kind[:3]}-"
        return prefix + mac[: self.length]

    def __repr__(self) -> str:  # never print the key
        return f"Pseudonymizer(length={self.length})"

"""Deterministic patient-level train/val/test split.

Each patient's split comes from a hash of (its pseudonym, split seed) alone, so a
patient keeps its split when the cohort grows and never lands in two splits (all of
a patient's rows share one pseudonym).
"""

from __future__ import annotations

import hashlib

from cohortcast.config import SplitConfig

SPLITS = ("train", "val", "test")


def unit_hash(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(pseudonym: str, cfg: SplitConfig) -> str:
    u = unit_hash(pseudonym, cfg.seed)
    if u < cfg.train:
        return "train"
    if u < cfg.train + cfg.val:
        return "val"
    return "test"

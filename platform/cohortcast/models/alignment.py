"""NAMD latent alignment loss (Eq. 2-4) and the nodule feature vector it aligns to.

Within a batch, pairwise distances in nodule-feature space and in latent space are
turned into per-row distributions over the other samples, sharpened by temperatures
tau_f and tau_z:  P_ij = softmax_{j != i}(-||x_i - x_j|| / tau). The loss is the mean
over rows of KL(P^f_i || P^z_i): zero exactly when the two neighbourhood structures
agree, whatever their absolute scales (absorbed by the temperatures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cohortcast.data.manifest import ATTENUATIONS, LOBES, MARGINS


def _row_log_distributions(x: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, D) -> (B, B) log P with the diagonal excluded (log P_ii = -inf)."""
    # Squared distances via the Gram matrix, then sqrt with an epsilon: torch.cdist's
    # gradient is NaN at zero distance, which the diagonal always is.
    sq = (x * x).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)
    dist = torch.sqrt(d2 + 1e-12)
    logits = -dist / tau
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.log_softmax(logits.masked_fill(eye, float("-inf")), dim=-1)


def alignment_loss(features: torch.Tensor, latents: torch.Tensor, tau_f: float, tau_z: float) -> torch.Tensor:
    """KL(P^f || P^z) averaged over the batch. `latents` may be (B, C, H, W): flattened."""
    if features.shape[0] != latents.shape[0]:
        raise ValueError(f"batch sizes differ: features {features.shape[0]}, latents {latents.shape[0]}")
    if features.shape[0] < 3:
        return latents.sum() * 0.0  # with fewer than 3 samples each row has one neighbour: nothing to align
    log_pf = _row_log_distributions(features.flatten(1).float(), tau_f)
    log_pz = _row_log_distributions(latents.flatten(1).float(), tau_z)
    eye = torch.eye(features.shape[0], dtype=torch.bool, device=features.device)
    pf = log_pf.exp()
    kl = torch.where(eye, torch.zeros_like(pf), pf * (log_pf - log_pz))
    return kl.sum(-1).mean()


def nodule_features(rows: Sequence[Mapping[str, Any]], diameter_scale_mm: float = 10.0) -> torch.Tensor:
    """Nodule attributes -> (B, 2 + 3 + 3 + 6) vector: diameters in units of
    `diameter_scale_mm`, then one-hot attenuation, margins and lobe (all zeros when
    missing). Distances in this space are what the latent space is aligned to."""
    out = []
    for row in rows:
        vec = [
            float(row.get("SCT_LONG_DIA") or 0.0) / diameter_scale_mm,
            float(row.get("SCT_PERP_DIA") or 0.0) / diameter_scale_mm,
        ]
        for key, values in (("SCT_PRE_ATT", ATTENUATIONS), ("SCT_MARGINS", MARGINS), ("SCT_EPI_LOC", LOBES)):
            vec.extend(float(row.get(key) == v) for v in values)
        out.append(vec)
    return torch.tensor(out, dtype=torch.float32)

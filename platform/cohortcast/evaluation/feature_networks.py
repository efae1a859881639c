"""Feature networks for the image-quality metrics, from local files only.

- FID: the standard FID Inception-v3 as TorchScript (`inception-2015-12-05.pt`, the file
  StyleGAN2-ADA and clean-fid load), called as `net(images_0_255, return_features=True)`
  -> (B, 2048) pool3 features.
- LPIPS: cohortcast.models.perceptual.LPIPS from a torchvision vgg16 state dict and the
  lpips package's heads.
- The evaluator ViT's [CLS] features: the labelled fallback Frechet feature space.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cohortcast.errors import MissingInputError

INCEPTION_SPACE = "inception-v3 pool3 (FID)"
EVALUATOR_SPACE = "evaluator ViT [CLS] (not FID)"

Features = Callable[[np.ndarray], np.ndarray]  # (n, H, W) crops in [-1, 1] -> (n, d)


def batched(fn: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = torch.tensor(np.asarray(images[start : start + batch_size], np.float32))[:, None]
            out.append(fn(chunk).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def inception_features(path: str | Path, batch_size: int) -> Features:
    if not Path(path).is_file():
        raise MissingInputError(f"{path}: no Inception TorchScript file (evaluation.inception_torchscript)")
    net = torch.jit.load(str(path), map_location="cpu").eval()

    def features(crops: torch.Tensor) -> torch.Tensor:
        rgb = ((crops.clamp(-1, 1) + 1) * 127.5).expand(-1, 3, -1, -1)  # the network resizes to 299 itself
        return net(rgb, return_features=True)

    return lambda images: batched(features, images, batch_size)


def lpips_distances(vgg_path: str | Path, lpips_path: str | Path, batch_size: int):
    """-> fn(a, b) with a, b (n, H, W) in [-1, 1] -> (n,) LPIPS distances."""
    from cohortcast.models.perceptual import LPIPS

    for path in (vgg_path, lpips_path):
        if not Path(path).is_file():
            raise MissingInputError(f"{path}: LPIPS weight file not found (evaluation.lpips_vgg_path / lpips_path)")
    net = LPIPS.from_files(vgg_path, lpips_path)

    def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        pairs = np.stack([a, b], axis=1).astype(np.float32)  # (n, 2, H, W)
        out = []
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                chunk = torch.from_numpy(pairs[start : start + batch_size])
                out.append(net(chunk[:, :1], chunk[:, 1:]).numpy())
        return np.concatenate(out)

    return distances

"""Consolidated fp32 weights from a DeepSpeed checkpoint reported through Ray Train,
for any ZeRO stage (ZeRO-3 shards the parameters themselves, so rank 0's model file
alone is not enough there: DeepSpeed's zero_to_fp32 gathers them)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from cohortcast.training.checkpoints import TAG


def consolidated_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    """`checkpoint`: a ray.train.Checkpoint (or a local folder) written by save_and_report,
    or a .safetensors file of module weights (the best validation weights, see
    stage_loop.StageHooks.best_path)."""
    if isinstance(checkpoint, (str, Path)) and str(checkpoint).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(checkpoint))
    folder_ctx = (
        checkpoint.as_directory() if hasattr(checkpoint, "as_directory") else contextlib.nullcontext(str(checkpoint))
    )
    with folder_ctx as folder:
        tag_dir = Path(folder) / TAG
        if any(tag_dir.glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG))
        model_file = tag_dir / "mp_rank_00_model_states.pt"  # ZeRO stage 0: plain model states
        return torch.load(model_file, map_location="cpu", weights_only=False)["module"]

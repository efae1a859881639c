"""Best-validation weights (StageHooks.best_metric / best_path): written on improvement
only, and read back by the export like a checkpoint."""

from pathlib import Path

import torch
from torch import nn

from cohortcast.training.export import consolidated_state_dict
from cohortcast.training.stage_loop import _keep_if_best


class FakeEngine:
    """The two things _keep_if_best reads of a DeepSpeed engine."""

    def __init__(self, module: nn.Module):
        self.module, self.global_steps = module, 0


def test_best_weights_are_kept_only_on_improvement(tmp_path):
    """Guards training.stage_loop._keep_if_best (lower is better): the first value and
    every improvement write the module's weights (atomically, no temp file left); a
    worse, equal or non-finite (NaN) value leaves the file alone; consolidated_state_dict reads the
    .safetensors file back (str or Path) as the stage export does."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    engine = FakeEngine(module)
    best = {"value": None, "step": None}
    path = tmp_path / "best" / "best_validation.safetensors"  # its folder does not exist yet

    def snapshot():
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def bump(step):
        engine.global_steps = step
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1.0)

    bump(1)
    _keep_if_best(engine, 0.5, best, str(path))
    first = snapshot()
    assert path.is_file() and best == {"value": 0.5, "step": 1}
    bump(2)
    _keep_if_best(engine, 0.7, best, str(path))  # worse
    bump(3)
    _keep_if_best(engine, 0.5, best, str(path))  # equal: not an improvement
    assert best == {"value": 0.5, "step": 1}
    saved = consolidated_state_dict(str(path))
    assert saved.keys() == first.keys() and all(torch.equal(saved[k], first[k]) for k in first)
    bump(4)
    _keep_if_best(engine, float("nan"), best, str(path))  # a diverged validation is never the best
    _keep_if_best(engine, float("inf"), best, str(path))
    assert best == {"value": 0.5, "step": 1}
    saved = consolidated_state_dict(str(path))
    assert all(torch.equal(saved[k], first[k]) for k in first)
    _keep_if_best(engine, 0.2, best, str(path))  # better
    assert best == {"value": 0.2, "step": 4}
    saved = consolidated_state_dict(Path(path))
    assert all(torch.equal(saved[k], v) for k, v in snapshot().items())
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    fresh.load_state_dict(saved)  # loads into the module as exported weights

"""LPIPS (Zhang et al. 2018), VGG16 variant, without torchvision or a model hub.

The VGG16 convolutional trunk is declared here with torchvision's layer indices, so a
torchvision `vgg16` state dict (`features.N.weight`) loads as is; the LPIPS linear
heads load from the lpips package's `vgg.pth` layout (`linK.model.1.weight`). Both
files come from local paths. LPIPS = sum over 5 layers of the spatially averaged,
channel-weighted squared difference of unit-normalised features.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# torchvision VGG16 "D" configuration; "M" = max pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in `features`
_CHANNELS = (64, 128, 256, 512, 512)
# ImageNet statistics in LPIPS's [-1, 1] input convention (lpips.ScalingLayer).
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return nn.Sequential(*layers[: _TAPS[-1] + 1])


class _Head(nn.Module):
    """lpips.NetLinLayer: dropout (index 0) then a bias-free 1x1 conv (index 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        for k, c in enumerate(_CHANNELS):
            setattr(self, f"lin{k}", _Head(c))
        self.register_buffer("shift", _SHIFT.clone(), persistent=False)
        self.register_buffer("scale", _SCALE.clone(), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg_path: str | Path, lpips_path: str | Path) -> LPIPS:
        model = cls()
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
        features = {k[len("features.") :]: v for k, v in vgg.items() if k.startswith("features.")}
        missing = set(model.features.state_dict()) - set(features)
        if missing:
            raise ValueError(f"{vgg_path}: not a torchvision vgg16 state dict (missing features.{sorted(missing)[0]})")
        model.features.load_state_dict({k: features[k] for k in model.features.state_dict()})
        heads = torch.load(lpips_path, map_location="cpu", weights_only=True)
        model.load_state_dict({**{f"features.{k}": v for k, v in model.features.state_dict().items()}, **heads})
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1], C in {1, 3} -> (B,) distances."""
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        x, y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = x.new_zeros(x.shape[0])
        for k, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y))):
            fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
            fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
            head = getattr(self, f"lin{k}").model
            total = total + head((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
        return out

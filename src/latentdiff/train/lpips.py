"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant, from user-given weights.

latentdiff ships no VGG weights and downloads nothing: pass two files,

- ``vgg_path``: a torchvision ``vgg16`` state dict (e.g. ``vgg16-397923af.pth`` or a
  safetensors copy); only its ``features.*`` convolutions are used;
- ``lin_path``: the ``lpips`` package's ``weights/v0.1/vgg.pth`` (``lin0.model.1.weight``
  ... ``lin4.model.1.weight``, 1x1 conv heads without bias).

Distance, as the ``lpips`` package computes it: images in [-1, 1] are shifted and scaled
per channel, VGG features are taken after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3,
unit-normalised over channels, squared differences are weighted per channel by the heads,
averaged over space and summed over the five layers -> (B, 1, 1, 1).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.io import load_strict, read_state_dict

# torchvision's vgg16 ``features``: conv widths, "M" = 2x2 max-pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_SLICE_ENDS = (4, 9, 16, 23, 30)  # indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional trunk up to relu5_3, indexed as torchvision's ``features``."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = int(v)
    return nn.Sequential(*layers)


class _LinearHead(nn.Module):
    """lpips' ``NetLinLayer``: (dropout,) 1x1 conv C -> 1 without bias; keys ``model.1.weight``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG: ``lpips(a, b)`` for images (B, 3, H, W) in [-1, 1] -> (B, 1, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = vgg16_features()
        for i, ch in enumerate(_CHANNELS):
            self.add_module(f"lin{i}", _LinearHead(ch))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> LPIPS:
        """Load VGG16 ``features.*`` and the five lpips heads strictly (naming what is missing)."""
        model = cls()
        vgg = {k: v for k, v in read_state_dict(vgg_path).items() if k.startswith("features.")}
        lin = {k: v for k, v in read_state_dict(lin_path).items() if k.startswith("lin")}
        state = {**vgg, **lin}
        load_strict(model, state, "LPIPS (VGG16 features + lpips vgg.pth heads)")
        return model.requires_grad_(False).eval()

    def _feature_maps(self, x: Tensor) -> list[Tensor]:
        x = (x - self.shift) / self.scale
        maps, start = [], 0
        for end in _SLICE_ENDS:
            for layer in self.features[start:end]:
                x = layer(x)
            maps.append(x)
            start = end
        return maps

    def train(self, mode: bool = True) -> LPIPS:  # always frozen, always eval
        return super().train(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        total = a.new_zeros(a.shape[0], 1, 1, 1)
        for i, (fa, fb) in enumerate(zip(self._feature_maps(a), self._feature_maps(b))):
            fa = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            fb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            head: _LinearHead = getattr(self, f"lin{i}")
            total = total + head((fa - fb).pow(2)).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
        return total

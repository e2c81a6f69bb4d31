"""InceptionV3 as FID uses it: the 2015-12-05 TensorFlow graph ported to PyTorch (pytorch-fid's network).

FID scores are only comparable when computed with this exact network, which differs from
torchvision's ImageNet InceptionV3 in its weights (1008 classes) and in three block types:

* ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1``: the 3x3 average pool of the
  pool branch ignores padded zeros (``count_include_pad=False``), as TensorFlow's does;
* ``FIDInceptionE_2`` (``Mixed_7c``): the pool branch uses a 3x3 *max* pool.

Module names are torchvision's ``Inception3`` names, which are the keys of pytorch-fid's
weight file ``pt_inception-2015-12-05-6726825d.pth`` (and of torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``): ``Conv2d_1a_3x3.conv.weight``,
``Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}``, ``Mixed_5b.branch1x1.conv.weight``,
..., ``fc.{weight,bias}`` (1008 classes; no ``AuxLogits``). :func:`load_fid_inception` reads
such a file with ``weights_only=True`` and loads it strictly.

Input handling follows pytorch-fid: images in [0, 1] are resized to 299 x 299 with
``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing) and scaled to
[-1, 1] with ``2 x - 1``. (torch-fidelity and the original TensorFlow code resize with
TensorFlow 1's bilinear and scale uint8 with ``(x - 128) / 128``; their FIDs differ from
pytorch-fid's slightly. latentdiff follows pytorch-fid.)

The network's weights are not shipped: download pytorch-fid's file yourself and pass its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.errors import CheckpointError
from ..models.clip_model import Images, image_list

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008


class BasicConv2d(nn.Module):
    """Convolution without bias -> batch norm (eps 1e-3) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """TensorFlow's 3x3 stride-1 'SAME' average pool: padded zeros are not counted."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b/c/d (35 x 35): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], dim=1)  # (B, 224 + pool_features, H, W)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)  # (B, 480 + C, H', W')


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e (17 x 17): factorised 7x7 branches."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], dim=1)  # (B, 768, H, W)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)  # (B, 512 + C, H', W')


class FIDInceptionE(nn.Module):
    """Mixed_7b (``max_pool=False``, TF average pool) and Mixed_7c (``max_pool=True``) at 8 x 8."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        # The FID graph's last block max-pools here (other Inceptions average-pool).
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], dim=1)  # (B, 2048, H, W)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's ``fid_inception_v3()``: images in [0, 1] -> pool3 features (B, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # in the weight file; unused by FID

    def forward(self, images: Tensor, resize: bool = True) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048).

        ``resize`` bilinearly resizes to 299 x 299 first, as pytorch-fid does (identity at 299).
        """
        x = images.to(self.fc.weight.dtype)
        if resize:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... -> (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048): the pool3 features

    def logits(self, features: Tensor) -> Tensor:
        """pool3 features (B, 2048) -> the 1008 class logits (for the Inception Score)."""
        return self.fc(features)


def _describe_foreign(state_dict: dict[str, Tensor], where: str) -> str | None:
    """A clear message for weight files that are some other Inception, not FID's."""
    fc = state_dict.get("fc.weight")
    if any(k.startswith("AuxLogits.") for k in state_dict) or (fc is not None and fc.shape[0] == 1000):
        return (
            f"{where} holds torchvision's ImageNet InceptionV3 (1000 classes / AuxLogits), not the FID "
            f"network: FID needs pytorch-fid's {FID_WEIGHTS_NAME} (1008 classes), or scores are not comparable"
        )
    if any(k.startswith("blocks.") for k in state_dict):
        return (
            f"{where} is a state dict of pytorch-fid's InceptionV3 wrapper (blocks.N.M keys); "
            f"use the network's own weight file {FID_WEIGHTS_NAME}"
        )
    return None


def load_fid_inception(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> FIDInceptionV3:
    """Load pytorch-fid's ``pt_inception-2015-12-05-*.pth`` (or torch-fidelity's file, same keys) strictly.

    The file is read with ``torch.load(weights_only=True)``. BatchNorm ``num_batches_tracked``
    counters, which files written by old PyTorch versions lack, are not required (they play
    no part in evaluation). Any other missing, unexpected or mis-shaped key is an error that
    names it; torchvision's ImageNet Inception is recognised and refused.
    """
    from ..checkpoints.io import load_strict, read_state_dict

    path = Path(path)
    state_dict = read_state_dict(path)
    message = _describe_foreign(state_dict, path.name)
    if message:
        raise CheckpointError(message)
    with torch.device("meta"):
        model = FIDInceptionV3()
    for name, buffer in model.named_buffers():
        if name.endswith("num_batches_tracked") and name not in state_dict:
            state_dict[name] = torch.zeros((), dtype=buffer.dtype)
    load_strict(model, state_dict, f"FID Inception ({path.name})", device=device, dtype=dtype)
    return model.requires_grad_(False)  # type: ignore[return-value]


def fid_pixels(images: Images) -> list[Tensor]:
    """Images (any form :func:`~latentdiff.models.clip_model.image_list` takes) -> float (3, H, W) in [0, 1].

    uint8 is divided by 255 (as torchvision's ``ToTensor`` in pytorch-fid); floats are clamped to [0, 1].
    """
    return [t.float() / 255 if t.dtype == torch.uint8 else t.float().clamp(0, 1) for t in image_list(images)]


@torch.no_grad()
def inception_features(images: Images, model: FIDInceptionV3, batch_size: int = 50) -> np.ndarray:
    """pool3 features (N, 2048) float32 of images, in batches (each image resized to 299 first)."""
    param = model.fc.weight
    pictures = fid_pixels(images)
    if not pictures:
        raise ValueError("no images given")
    out = []
    for start in range(0, len(pictures), batch_size):
        batch = [
            F.interpolate(p[None].to(param.device, param.dtype), size=(INPUT_SIZE, INPUT_SIZE),
                          mode="bilinear", align_corners=False)
            for p in pictures[start: start + batch_size]
        ]
        out.append(model(torch.cat(batch), resize=False).float().cpu().numpy())
    return np.concatenate(out)

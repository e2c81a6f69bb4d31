"""Convolutions with their weights reordered once for oneDNN, instead of at every call.

On a CPU, ``F.conv2d`` hands oneDNN a plain (out, in, kh, kw) weight that it reorders into
its blocked layout at every call.  Where the weight is large next to the activation (the
UNet's low-resolution levels: 1280 channels on an 8x8 latent at 256 px) the reorder costs
more than the convolution itself.  :func:`prepack_convolutions` switches a module's
``nn.Conv2d`` layers to :class:`PrepackedConv2d`, which keeps the reordered weight and
reuses it while the weight is unchanged (measured in ``benchmarks/bench_kernels.py``).

- Only inference on the CPU (no autograd through the packed call: a forward that needs
  gradients, or any other device, takes the plain path), float32, and bfloat16 where
  oneDNN runs it (it needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; elsewhere bf16 takes the plain path).
- Only where it wins: a weight with at least as many elements as one image's input
  activation (below that, oneDNN's own reorder is cheap and the plain call is as fast).
- The weights and the state dict are untouched: the packed copy is a cache, rebuilt when
  the weight changes (a LoRA merged or unmerged in place, a ``.to()``), so every adapter
  and loader keeps working.  Results differ from ``F.conv2d`` by float rounding only.
- Memory: the packed copies of the packed layers (about a third of the UNet's weights).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


@functools.cache
def packed_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN can reorder and run here: float32, plus bfloat16 where the CPU has the
    instructions (asked of oneDNN itself: a CPU without them raises inside the reorder)."""
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.float32, torch.bfloat16) if bf16 is not None and bf16() else (torch.float32,)


def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class PrepackedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose CPU inference reuses a oneDNN-reordered weight (see the module)."""

    _packed: tuple[tuple, Tensor] | None = None  # (key, reordered weight)

    def _key(self, x: Tensor) -> tuple:
        w = self.weight
        return (tuple(x.shape), w.data_ptr(), w._version, w.dtype)

    def _use_packed(self, x: Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == self.weight.dtype
            and x.dtype in packed_dtypes()
            and x.ndim == 4
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and self.weight.numel() >= x[0].numel()
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self._use_packed(x):
            return super().forward(x)
        key = self._key(x)
        if self._packed is None or self._packed[0] != key:
            weight = self.weight.detach().to_mkldnn()
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
            self._packed = (key, packed)
        bias = self.bias.detach() if self.bias is not None else None
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed[1], bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")  # (B, out, h', w') in x's plain layout

    def _apply(self, fn, recurse=True):  # .to() / .float(): the packed copy is stale
        self._packed = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # copies and pickles leave the cache (a oneDNN tensor) behind
        state = dict(self.__dict__)
        state.pop("_packed", None)
        return state


def prepack_convolutions(module: nn.Module) -> nn.Module:
    """Switch every ``nn.Conv2d`` of ``module`` to :class:`PrepackedConv2d` in place; returns it.
    A no-op where this torch has no oneDNN."""
    if not _available():
        return module
    for layer in module.modules():
        if type(layer) is nn.Conv2d:
            layer.__class__ = PrepackedConv2d
    return module


def unpack_convolutions(module: nn.Module) -> nn.Module:
    """Undo :func:`prepack_convolutions` (plain ``nn.Conv2d`` again, caches dropped)."""
    for layer in module.modules():
        if type(layer) is PrepackedConv2d:
            layer._packed = None
            layer.__class__ = nn.Conv2d
    return module


def is_prepacked(module: nn.Module) -> bool:
    return any(type(layer) is PrepackedConv2d for layer in module.modules())


__all__ = ["PrepackedConv2d", "is_prepacked", "prepack_convolutions", "unpack_convolutions"]

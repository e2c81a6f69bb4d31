"""DeepCache: reuse the UNet's deep features across steps (Ma et al., 2023).

Neighbouring denoising steps change the UNet's high-level features little.  With
``cache_interval=N``, one UNet call in N runs the whole network and keeps the input of the
last layer of the last up block (the deep branch's output, concatenated there with the
``conv_in`` skip); the N - 1 calls after it run only ``conv_in``, that last layer and
``conv_out`` on the kept features.  This is the reference implementation's
``DeepCacheSDHelper`` with ``cache_branch_id=0`` and the uniform schedule (tested equal).

Calls are counted, not steps: a sampler that evaluates the model twice a step (Heun, DPM2,
DPM++ SDE) counts both.  The first call of a generation is always a full one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class FeatureCache:
    """The kept features of one generation, and its call counter."""

    interval: int
    calls: int = 0
    features: Tensor | None = None  # (B, C0, h, w): the input of the last up-block layer

    def reuse(self, shape: tuple[int, ...]) -> bool:
        """Whether this call reuses the kept features (counts the call)."""
        full = self.calls % self.interval == 0 or self.features is None or self.features.shape[0] != shape[0]
        self.calls += 1
        return not full

    def store(self, features: Tensor) -> None:
        self.features = features

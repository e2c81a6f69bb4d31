"""Per-sample random draws keyed by the sample's global index, so results do not depend on how
a batch is split (over ranks, or into accumulation micro-batches).

Sample ``n`` of a run is the ``n``-th item drawn from the data order since step 0: optimizer
step ``s``, micro-batch ``m`` of ``grad_accum``, position ``j`` in the global batch of
``B = batch_size x ranks`` has ``n = (s * grad_accum + m) * B + j`` (:func:`sample_ids`). Its
draws come from a CPU generator seeded with a hash of ``(seed, stream, n)``
(:func:`sample_generator`), in a fixed order per trainer, so:

- one process with ``batch_size 4`` and two ranks with ``batch_size 2`` draw the same noise
  for the same images;
- nothing needs saving to resume exactly: the draws of step ``s`` are a pure function of ``s``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: streams of draws (one per use, so two uses of the same sample never share numbers)
DIFFUSION, LCM, EMBEDDING, POSTERIOR, CODEBOOK = 1, 2, 3, 4, 5


def sample_generator(seed: int, stream: int, sample: int) -> torch.Generator:
    """A CPU generator for sample ``sample`` of ``stream`` in a run seeded ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{sample}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def sample_ids(step: int, micro: int, grad_accum: int, global_batch: int, start: int, count: int) -> list[int]:
    """Global indices of the ``count`` samples at positions ``start..`` of micro-batch ``micro`` of ``step``."""
    base = (step * grad_accum + micro) * global_batch + start
    return list(range(base, base + count))


def stacked(ids: Sequence[int], seed: int, stream: int, draw: Callable[[torch.Generator], Sequence[Tensor]]) -> list[Tensor]:
    """``draw(generator)`` for each sample, each of its outputs stacked over the samples: (B, ...) tensors."""
    per_sample = [draw(sample_generator(seed, stream, n)) for n in ids]
    return [torch.stack(parts) for parts in zip(*per_sample)]

"""``torch.compile`` for the UNet, an option (``load(..., compile=True)``, ``--compile``).

The UNet's forward is compiled in place with TorchInductor (``nn.Module.compile``): the module,
its state dict and its parameters stay what they are, so LoRAs merged later are seen (the
weights are read at run time; inductor's ``freezing``, which bakes them in, is not used).
The first generation pays the compile time (minutes for SD 1.5 on a small CPU; measured in
``benchmarks/bench_kernels.py``), a new image size compiles again.  The convolutions go back
to the plain ``nn.Conv2d`` (inductor chooses its own kernels).  Needs a C++ compiler on CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .prepack import unpack_convolutions

if TYPE_CHECKING:
    from ..pipeline import Pipeline


def compile_unet(pipe: Pipeline) -> Pipeline:
    """Compile ``pipe.unet``'s forward in place; returns ``pipe``."""
    unpack_convolutions(pipe.unet)
    pipe.unet.compile()
    return pipe

"""Speed: the default dtype for the machine, and other measured, optional accelerations."""

from .dtype import DtypeChoice, choose_dtype, native_bf16
from .prepack import PrepackedConv2d, is_prepacked, prepack_convolutions, unpack_convolutions

__all__ = ["DtypeChoice", "PrepackedConv2d", "choose_dtype", "is_prepacked", "native_bf16", "prepack_convolutions",
           "unpack_convolutions"]

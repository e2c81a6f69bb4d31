"""Test-only plumbing for reference libraries that are installed without all their dependencies."""

from __future__ import annotations

import importlib.util
import sys
import types


def torch_fidelity_importable() -> bool:
    """Make ``torch_fidelity.<module>`` importable where torchvision is not installed.

    torch-fidelity's InceptionV3 (the FID network) needs only torch, but the package's
    ``__init__`` imports every feature extractor, some of which import torchvision (which
    cannot be installed beside a CPU-only torch here). torchmetrics imports
    ``torch_fidelity.feature_extractor_inceptionv3`` as soon as torch-fidelity is installed.
    Where torchvision is missing, register the package as an empty shell with the real
    ``__path__``, so its torchvision-free submodules import and the rest are never run.
    Returns False where torch-fidelity is not installed (``pip install --no-deps torch-fidelity``).
    """
    if "torch_fidelity" in sys.modules:
        return True
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        return False
    if importlib.util.find_spec("torchvision") is not None:
        return True  # the real package imports as it is
    shell = types.ModuleType("torch_fidelity")
    shell.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = shell
    return True

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


def k_diffusion_sampling() -> types.ModuleType | None:
    """``k_diffusion.sampling`` (and ``k_diffusion.external``), importable without k-diffusion's extras.

    k-diffusion is installed with ``--no-deps``: its package ``__init__`` imports every module
    (jsonmerge, clean-fid, torchvision ...), ``utils`` imports torchvision and ``sampling``
    imports torchdiffeq for ``log_likelihood`` only.  As for torch-fidelity, the package is
    registered as an empty shell with the real ``__path__``; where they are missing,
    ``k_diffusion.utils`` is stood in for by a module with the one helper the samplers and
    ``external`` use (``append_dims``) and ``torchdiffeq`` by a module whose ``odeint`` raises.
    Returns None where k-diffusion is not installed.
    """
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    if "k_diffusion" not in sys.modules:
        shell = types.ModuleType("k_diffusion")
        shell.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = shell
    if importlib.util.find_spec("torchvision") is None and "k_diffusion.utils" not in sys.modules:
        utils = types.ModuleType("k_diffusion.utils")

        def append_dims(x, target_dims):
            """k-diffusion's ``utils.append_dims``: trailing singleton dims up to ``target_dims``."""
            dims_to_append = target_dims - x.ndim
            if dims_to_append < 0:
                raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
            return x[(...,) + (None,) * dims_to_append]

        utils.append_dims = append_dims
        sys.modules["k_diffusion.utils"] = utils
        sys.modules["k_diffusion"].utils = utils
    if importlib.util.find_spec("torchdiffeq") is None and "torchdiffeq" not in sys.modules:
        torchdiffeq = types.ModuleType("torchdiffeq")

        def odeint(*args, **kwargs):
            raise NotImplementedError("torchdiffeq is not installed (k-diffusion's log_likelihood needs it)")

        torchdiffeq.odeint = odeint
        sys.modules["torchdiffeq"] = torchdiffeq
    sampling = importlib.import_module("k_diffusion.sampling")
    importlib.import_module("k_diffusion.external")
    return sampling

"""latentdiff: Stable Diffusion from the ground up.

    import latentdiff, torch
    pipe = latentdiff.load(path, device="cpu", dtype=torch.float32)  # diffusers folder or single file
    emb = pipe.encode_prompt(["a red circle", "a cat"])             # (B, 77, D)
    eps = pipe.unet(x, t, emb)                                     # noise prediction
    post = pipe.vae.encode(images); img = pipe.vae.decode(latents)
    pipe.save("out_folder")                                        # or "model.safetensors"
"""

from . import budget
from .checkpoints.errors import CheckpointError
from .errors import BadArgument, BadFile, BadModel, OutOfBudget, UserError
from .loading import load, load_component
from .pipeline import Pipeline
from .settings import GenerationOptions

__all__ = ["BadArgument", "BadFile", "BadModel", "CheckpointError", "GenerationOptions", "OutOfBudget", "Pipeline",
           "UserError", "budget", "load", "load_component"]
__version__ = "0.1.0"

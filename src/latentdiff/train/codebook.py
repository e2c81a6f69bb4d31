"""Training a VQ autoencoder's codebook: the two quantisation losses, EMA updates, dead-code restarts, usage.

For pre-quantisation latents h (B, e, h, w) and their nearest codes c (the VQ-VAE paper's terms):

    commitment = mean((h - sg[c])^2)      pulls the encoder to the codes, weighted by beta
    codebook   = mean((c - sg[h])^2)      pulls the codes to the encoder (``codebook_update = "loss"``)

With ``codebook_update = "ema"`` the codebook takes no gradient; after each optimizer step every
code moves to the running mean of the latents assigned to it (VQ-VAE-2 / SoundStream):
``N_k <- d N_k + (1 - d) n_k``, ``m_k <- d m_k + (1 - d) sum_{h -> k} h``, ``c_k = m_k / N~_k``
(Laplace-smoothed counts). A code no latent picked for ``dead_code_steps`` steps is restarted
at a latent of the step's batch drawn at random (a generator seeded by the step). Both use the
latents of the whole global batch (gathered over torchrun ranks), so they do not depend on
how the batch is split. Usage per step: the perplexity exp(-sum p log p) of the codes' shares
and the share of the codebook in use.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.vq import VectorQuantizer

EPS = 1e-5  # Laplace smoothing of the EMA counts


def quantisation_losses(h: Tensor, quantizer: VectorQuantizer, indices: Tensor) -> tuple[Tensor, Tensor]:
    """(commitment, codebook) for latents ``h`` (B, e, h, w) and their codes ``indices`` (B*h*w,)."""
    b, e, hh, ww = h.shape
    codes = quantizer.embedding(indices).view(b, hh, ww, e).permute(0, 3, 1, 2)  # (B, e, h, w)
    return torch.mean((h - codes.detach()) ** 2), torch.mean((codes - h.detach()) ** 2)


def usage(indices: Tensor, num_codes: int) -> tuple[float, float]:
    """(perplexity, share of codes used) of one batch's code indices."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).double()
    p = counts / counts.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), float((counts > 0).double().mean())


class CodebookState(nn.Module):
    """The EMA statistics and idle counters of a codebook (buffers, so checkpoints carry them)."""

    def __init__(self, quantizer: VectorQuantizer) -> None:
        super().__init__()
        k, e = quantizer.embedding.weight.shape
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("embed_sum", quantizer.embedding.weight.detach().clone())
        self.register_buffer("idle", torch.zeros(k, dtype=torch.long))

    @torch.no_grad()
    def update(self, quantizer: VectorQuantizer, latents: Tensor, indices: Tensor, *, ema: bool, decay: float,
               dead_code_steps: int, generator: torch.Generator) -> int:
        """Move the codes after an optimizer step; returns how many dead codes were restarted.

        ``latents`` (N, e) and ``indices`` (N,) are the step's global batch, flattened.
        """
        weight = quantizer.embedding.weight
        k = weight.shape[0]
        counts = torch.bincount(indices, minlength=k).to(weight.dtype)  # (K,)
        if ema:
            sums = torch.zeros_like(weight).index_add_(0, indices, latents.to(weight.dtype))  # (K, e)
            self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + EPS) / (total + k * EPS) * total
            weight.copy_(self.embed_sum / smoothed[:, None])
        self.idle.add_(1)
        self.idle[counts > 0] = 0
        if dead_code_steps <= 0:
            return 0
        dead = torch.nonzero(self.idle >= dead_code_steps).flatten()
        if len(dead) == 0:
            return 0
        picks = torch.randint(0, latents.shape[0], (len(dead),), generator=generator)
        weight[dead] = latents[picks].to(weight.dtype)
        self.embed_sum[dead] = weight[dead]
        self.cluster_size[dead] = 1.0
        self.idle[dead] = 0
        return len(dead)

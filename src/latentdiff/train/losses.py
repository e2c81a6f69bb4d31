"""Autoencoder losses: reconstruction term, KL term, PatchGAN discriminator, hinge loss, adaptive GAN weight.

These follow taming-transformers / LDM (``LPIPSWithDiscriminator``,
``NLayerDiscriminator``) so that published VAE training recipes carry over:

- ``l1_error``: per-pixel |x - x_hat|, less a tolerance (latentdiff's addition, 0 = LDM's L1);
- ``kl_loss``: KL(q(z|x) || N(0, I)) summed over latent dimensions, averaged over the batch;
- ``NLayerDiscriminator``: pix2pix's PatchGAN (4x4 convs, BatchNorm, LeakyReLU 0.2),
  giving one real/fake logit per overlapping patch;
- ``hinge_d_loss``: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]); the generator
  gets ``-E[D(x_hat)]``;
- ``adaptive_weight``: ||grad_L(rec)|| / (||grad_L(gan)|| + 1e-4) at the decoder's last
  layer L, clamped to [0, 1e4], which balances the two terms without tuning;
- ``disc_factor``: 0 before the delayed start step, 1 from it on.

Also ``clip_loss``, the CLIP trainer's loss: symmetric InfoNCE with per-image hard-negative texts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.vae import DiagonalGaussian


def l1_error(images: Tensor, recon: Tensor, tolerance: float = 0.0) -> Tensor:
    """Per-pixel reconstruction error ``max(|x - x_hat| - tolerance, 0)``, the shape of ``images``.

    With a tolerance, errors too small to matter cost nothing and get no gradient, so the
    gradient goes to the pixels still visibly wrong (on a flat-coloured world, the edges).
    """
    error = (images - recon).abs()
    return (error - tolerance).clamp(min=0) if tolerance > 0 else error


def kl_loss(posterior: DiagonalGaussian) -> Tensor:
    """Mean over the batch of KL(posterior || N(0, I)) summed over (c, h, w): a scalar."""
    return posterior.kl().mean()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: Tensor) -> Tensor:
    """The generator's side of the hinge GAN: -mean(D(x_hat))."""
    return -logits_fake.mean()


def disc_factor(step: int, start: int) -> float:
    """1.0 once ``step`` (optimizer steps done) has reached ``start``, else 0.0."""
    return 1.0 if step >= start else 0.0


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4,
                    reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """||d rec / d W|| / (||d gan / d W|| + 1e-4), clamped to [0, max_weight], detached.

    ``last_layer`` is the decoder's final conv weight; both losses must still hold their graph.
    ``reduce`` (data-parallel runs) turns each rank's gradient into the global batch's, before the norms.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    if reduce is not None:
        rec_grad, gan_grad = reduce(rec_grad), reduce(gan_grad)
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class NLayerDiscriminator(nn.Module):
    """PatchGAN: image (B, 3, H, W) -> logits (B, 1, h, w), one per receptive-field patch.

    ``n_layers`` stride-2 stages (channels ``ndf * min(2**i, 8)``), then a stride-1 stage and
    the 1-channel output conv. The input side must be at least ``2 ** (n_layers + 2)`` pixels.
    Weights are initialised as in taming (conv N(0, 0.02), BatchNorm scale N(1, 0.02)); pass
    a generator for a reproducible draw.
    """

    def __init__(
        self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self._init_weights(generator)

    @torch.no_grad()
    def _init_weights(self, generator: torch.Generator | None) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.02)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=generator) * 0.02)
                m.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        side = min(x.shape[-2:])
        if side < 2 ** (self.n_layers + 2):
            raise ValueError(
                f"images of side {side} are too small for a {self.n_layers}-layer PatchGAN "
                f"(needs >= {2 ** (self.n_layers + 2)}); lower disc_layers"
            )
        return self.main(x)


def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    hard_emb: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Symmetric InfoNCE with per-image hard-negative texts.

    image_emb (B, P), text_emb (B, P): pair i matches; embeddings need not be normalised.
    logit_scale: () log of the inverse temperature. hard_emb (B, K, P): image i's hard
    negatives, extra candidates in row i only (image -> text). mask (B, B) bool: True where
    text j must not count as a negative of image i (it also describes image i); the diagonal
    is ignored. Returns (loss, parts) with parts ``i2t``, ``t2i`` (the two cross-entropies),
    ``acc`` (images whose caption wins its row, hard negatives included) and ``hard_acc``
    (images whose caption beats all its hard negatives).
    """
    b = image_emb.shape[0]
    image = F.normalize(image_emb.float(), dim=-1)
    text = F.normalize(text_emb.float(), dim=-1)
    scale = logit_scale.float().exp()
    logits = scale * image @ text.t()  # (B, B)
    targets = torch.arange(b, device=logits.device)
    if mask is not None:
        off_diagonal = mask.to(torch.bool) & ~torch.eye(b, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(off_diagonal, float("-inf"))
    rows = logits
    hard_acc = torch.ones((), device=logits.device)
    if hard_emb is not None and hard_emb.shape[1] > 0:
        hard = F.normalize(hard_emb.float(), dim=-1)
        hard_logits = scale * torch.einsum("bp,bkp->bk", image, hard)  # (B, K)
        rows = torch.cat([logits, hard_logits], dim=1)  # (B, B + K)
        hard_acc = (logits.diagonal()[:, None] > hard_logits).all(dim=1).float().mean()
    i2t = F.cross_entropy(rows, targets)
    t2i = F.cross_entropy(logits.t(), targets)
    acc = (rows.argmax(dim=1) == targets).float().mean()
    return (i2t + t2i) / 2, {"i2t": i2t, "t2i": t2i, "acc": acc, "hard_acc": hard_acc}


"""Prompt weighting and long prompts, as AUTOMATIC1111 users write them.

Syntax (A1111's):
    (word)        weight x 1.1          ((word)) x 1.21, and so on
    [word]        weight / 1.1
    (word:1.5)    weight x 1.5          (nests: ((a:2)) = 2 x 1.1)
    \\( \\) \\[ \\]   literal brackets;   an unclosed bracket applies to the rest of the prompt

Long prompts: the prompt's tokens are cut into chunks of ``max_length - 2`` (75)
tokens, each chunk is framed by the start and end tokens, padded to 77 and
encoded on its own, and the hidden states are concatenated along the sequence
(B, 77 * chunks, D); the UNet's cross-attention takes any sequence length.
A prompt with no weights that fits one chunk encodes exactly as the plain
tokenizer would (same ids, same padding), so results equal diffusers'.

Weights scale each token's hidden state, and then the whole chunk is rescaled so
its mean is unchanged (A1111's behaviour); a prompt whose weights are all 1 is untouched.
Not supported (documented choice): A1111's ``BREAK`` keyword and its comma
back-tracking when cutting chunks; chunks are cut at exactly 75 tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from .errors import BadArgument

_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]          # escaped bracket or backslash
    | \\                  # lone backslash
    | \(                  # open round
    | \[                  # open square
    | :\s*([+-]?[.\d]+)\s*\)   # explicit weight closing a round bracket
    | \)                  # close round
    | \]                  # close square
    | [^\\()\[\]:]+       # plain text
    | :                   # a colon that is not a weight
    """,
    re.VERBOSE,
)

ROUND = 1.1
SQUARE = 1 / 1.1


def parse_weighted_prompt(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments; adjacent equal weights are merged.

    A weight that is not finite (one written with hundreds of digits, or nested weights
    whose product overflows) raises :class:`~latentdiff.errors.BadArgument`.

    >>> parse_weighted_prompt("a (red:1.5) [circle]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('circle', 0.9090909090909091)]
    """
    fragments: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _TOKEN.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\") and len(text) == 2:
            fragments.append([text[1], 1.0])
        elif text == "(":
            open_round.append(len(fragments))
        elif text == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:  # e.g. "(a:1.2.3)": keep the text as written
                fragments.append([text, 1.0])
                continue
            scale_from(open_round.pop(), factor)
        elif text == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif text == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        else:
            fragments.append([text, 1.0])
    for start in open_round:
        scale_from(start, ROUND)
    for start in open_square:
        scale_from(start, SQUARE)

    merged: list[tuple[str, float]] = []
    for text, weight in fragments:
        if not math.isfinite(weight):
            shown = text if len(text) <= 30 else text[:27] + "..."
            raise BadArgument(
                f"prompt weight of {shown!r} is {weight} (too large a weight, or nested weights that overflow); "
                "weights must be finite numbers"
            )
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


class Tokenizer(Protocol):
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    model_max_length: int

    def encode(self, text: str) -> list[int]: ...


@dataclass
class TokenChunks:
    """Token ids and weights of a batch of prompts, (B, chunks, max_length) each."""

    ids: Tensor  # (B, chunks, L) long
    weights: Tensor  # (B, chunks, L) float32


def tokenize_weighted(tokenizer: Tokenizer, prompts: list[str], min_chunks: int = 1) -> TokenChunks:
    """Tokenize with weights and cut into framed 75-token chunks; every prompt gets the same chunk count."""
    length = tokenizer.model_max_length
    body = length - 2
    per_prompt: list[tuple[list[int], list[float]]] = []
    for prompt in prompts:
        ids: list[int] = []
        weights: list[float] = []
        for text, weight in parse_weighted_prompt(prompt):
            tokens = tokenizer.encode(text)
            ids += tokens
            weights += [weight] * len(tokens)
        per_prompt.append((ids, weights))
    chunks = max([min_chunks] + [max(1, -(-len(ids) // body)) for ids, _ in per_prompt])

    all_ids = torch.full((len(prompts), chunks, length), tokenizer.pad_token_id, dtype=torch.long)
    all_weights = torch.ones((len(prompts), chunks, length), dtype=torch.float32)
    for b, (ids, weights) in enumerate(per_prompt):
        for c in range(chunks):
            piece = ids[c * body : (c + 1) * body]
            framed = [tokenizer.bos_token_id, *piece, tokenizer.eos_token_id]
            all_ids[b, c, : len(framed)] = torch.tensor(framed)
            all_weights[b, c, 1 : 1 + len(piece)] = torch.tensor(weights[c * body : (c + 1) * body])
    return TokenChunks(all_ids, all_weights)


def encode_chunks(encode: Callable[[Tensor], Tensor], chunks: TokenChunks) -> Tensor:
    """Run ``encode`` (ids (B, L) -> hidden (B, L, D)) on every chunk, weight, and concatenate.

    Returns (B, chunks * L, D).
    """
    outputs = []
    for c in range(chunks.ids.shape[1]):
        hidden = encode(chunks.ids[:, c])  # (B, L, D)
        weights = chunks.weights[:, c].to(hidden.device)  # (B, L)
        weighted_rows = (weights != 1).any(dim=1)  # (B,) prompts of this chunk that carry weights
        if weighted_rows.any():
            original_mean = hidden.float().mean(dim=(1, 2), keepdim=True)  # (B, 1, 1)
            weighted = hidden.float() * weights[:, :, None]
            new_mean = weighted.mean(dim=(1, 2), keepdim=True)
            # Restore the mean; a mean of ~0 (possible with untrained final norms) leaves the scale alone.
            ratio = torch.where(new_mean.abs() > 1e-6, original_mean / new_mean, torch.ones_like(new_mean))
            weighted = weighted * ratio
            hidden = torch.where(weighted_rows[:, None, None], weighted.to(hidden.dtype), hidden)
        outputs.append(hidden)
    return torch.cat(outputs, dim=1)

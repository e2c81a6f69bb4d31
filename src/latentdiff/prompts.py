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
from collections.abc import Mapping
from dataclasses import dataclass, field
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


#: token-id run of an embedding's name -> (name, vectors (n, D)); see latentdiff.adapters.embeddings
EmbeddingLookup = Mapping[tuple[int, ...], tuple[str, Tensor]]


def find_embedding_runs(ids: list[int], lookup: EmbeddingLookup) -> list[tuple[int, int, tuple[str, Tensor]]]:
    """(start, run length, (name, vectors)) of every embedding trigger in ``ids``, left to right.

    As A1111: at each position the longest matching name wins, and matching resumes after it.
    """
    if not lookup:
        return []
    runs_by_first: dict[int, list[tuple[int, ...]]] = {}
    for run in sorted(lookup, key=len, reverse=True):
        if run:
            runs_by_first.setdefault(run[0], []).append(run)
    found = []
    i = 0
    while i < len(ids):
        for run in runs_by_first.get(ids[i], ()):
            if tuple(ids[i : i + len(run)]) == run:
                found.append((i, len(run), lookup[run]))
                i += len(run)
                break
        else:
            i += 1
    return found


@dataclass
class TokenChunks:
    """Token ids and weights of a batch of prompts, (B, chunks, max_length) each.

    ``vectors`` lists the embedding vectors that replace the token embeddings at some
    positions: (prompt b, chunk c, first position in the framed chunk, vectors (n, D)).
    """

    ids: Tensor  # (B, chunks, L) long
    weights: Tensor  # (B, chunks, L) float32
    vectors: list[tuple[int, int, int, Tensor]] = field(default_factory=list)


#: token id put where embedding vectors go (A1111 uses 0 too); its token embedding is never used
EMBEDDING_PLACEHOLDER_ID = 0


def tokenize_weighted(tokenizer: Tokenizer, prompts: list[str], min_chunks: int = 1,
                      embeddings: EmbeddingLookup | None = None) -> TokenChunks:
    """Tokenize with weights and cut into framed 75-token chunks; every prompt gets the same chunk count.

    ``embeddings`` (token-id run of a name -> (name, vectors (n, D))): each run found in a
    fragment's ids becomes n positions carrying the fragment's weight. As A1111, an embedding is
    never split between chunks: when it does not fit, the current chunk is closed early.
    """
    length = tokenizer.model_max_length
    body = length - 2
    # per prompt: list of chunks, each (ids, weights, [(offset in body, vectors)])
    per_prompt: list[list[tuple[list[int], list[float], list[tuple[int, Tensor]]]]] = []
    for prompt in prompts:
        chunks: list[tuple[list[int], list[float], list[tuple[int, Tensor]]]] = []
        ids: list[int] = []
        weights: list[float] = []
        slots: list[tuple[int, Tensor]] = []

        def close() -> None:
            nonlocal ids, weights, slots
            chunks.append((ids, weights, slots))
            ids, weights, slots = [], [], []

        for text, weight in parse_weighted_prompt(prompt):
            tokens = tokenizer.encode(text)
            runs = {start: (size, vectors) for start, size, (_, vectors) in find_embedding_runs(tokens, embeddings or {})}
            i = 0
            while i < len(tokens):
                if i in runs:
                    size, vectors = runs[i]
                    if len(ids) + vectors.shape[0] > body:
                        close()
                    slots.append((len(ids), vectors))
                    ids += [EMBEDDING_PLACEHOLDER_ID] * vectors.shape[0]
                    weights += [weight] * vectors.shape[0]
                    i += size
                    continue
                if len(ids) == body:
                    close()
                ids.append(tokens[i])
                weights.append(weight)
                i += 1
        if ids or not chunks:
            close()
        per_prompt.append(chunks)
    count = max([min_chunks] + [len(c) for c in per_prompt])

    all_ids = torch.full((len(prompts), count, length), tokenizer.pad_token_id, dtype=torch.long)
    all_weights = torch.ones((len(prompts), count, length), dtype=torch.float32)
    all_ids[:, :, 0] = tokenizer.bos_token_id
    all_ids[:, :, 1] = tokenizer.eos_token_id  # empty chunks: start, end, padding
    vectors: list[tuple[int, int, int, Tensor]] = []
    for b, chunks in enumerate(per_prompt):
        for c, (ids, weights, slots) in enumerate(chunks):
            framed = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
            all_ids[b, c, : len(framed)] = torch.tensor(framed)
            all_weights[b, c, 1 : 1 + len(weights)] = torch.tensor(weights, dtype=torch.float32)
            vectors += [(b, c, 1 + offset, v) for offset, v in slots]
    return TokenChunks(all_ids, all_weights, vectors)


def encode_chunks(encode: Callable[..., Tensor], chunks: TokenChunks,
                  embed_tokens: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Run ``encode`` (ids (B, L) -> hidden (B, L, D)) on every chunk, weight, and concatenate.

    A chunk that carries embedding vectors is encoded as ``encode(ids, inputs_embeds)`` with
    ``inputs_embeds = embed_tokens(ids)`` (B, L, D) overwritten at the vectors' positions.
    Returns (B, chunks * L, D).
    """
    outputs = []
    for c in range(chunks.ids.shape[1]):
        ids = chunks.ids[:, c]  # (B, L)
        here = [(b, start, v) for b, cc, start, v in chunks.vectors if cc == c]
        if here:
            if embed_tokens is None:
                raise ValueError("chunks carry embedding vectors but no embed_tokens was given")
            inputs = embed_tokens(ids).clone()  # (B, L, D)
            for b, start, v in here:
                inputs[b, start : start + v.shape[0]] = v.to(inputs.device, inputs.dtype)
            hidden = encode(ids, inputs)  # (B, L, D)
        else:
            hidden = encode(ids)  # (B, L, D)
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

"""CLIP's byte-level BPE tokenizer, built on the ``tokenizers`` library.

Conventions (those of OpenAI CLIP, which SD 1.x uses):

* text is NFC-normalised, runs of white space become one space, and it is lower-cased;
* it is split with CLIP's regex (contractions, letter runs, single digits, runs of
  other symbols), each piece mapped to GPT-2's byte-level alphabet;
* BPE marks the end of each word with the ``</w>`` suffix;
* ``<|startoftext|>`` and ``<|endoftext|>`` are the last two ids of the vocabulary; SD 1.x
  pads with the end token.

A tokenizer folder holds either ``vocab.json`` + ``merges.txt`` (SD 1.x repositories) or
``tokenizer.json`` (what transformers 5 writes), plus optional ``tokenizer_config.json`` /
``special_tokens_map.json`` for the special tokens and ``model_max_length``.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..errors import BadModel

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77
# transformers writes a huge number for "no limit"; anything above this means "not set".
_UNSET_MAX_LENGTH = 10**6
# CLIP's pre-tokenisation pattern (its Python version is case-insensitive; the text is
# lower-cased before this runs, so the case-sensitive form is equivalent).
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


class TokenizerError(BadModel):
    """A tokenizer folder or file that cannot be read."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, in CLIP's vocabulary order.

    Bytes that are printable and not white space map to themselves (listed first, in
    byte order); the remaining 68 bytes map to code points 256, 257, ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` with CLIP's normaliser, pre-tokeniser and BPE model."""
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=unk_token,
        )
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Keep the regex matches, drop what lies between them (white space).
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


# How a special token is matched in raw text (tokenizers' AddedToken options). By default
# it is matched before normalisation, so "<|ENDOFTEXT|>" is not the end token; SD 1.x's
# tokenizer_config.json says ``"normalized": true`` (matched after lower-casing).
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' order
_MATCH_FLAGS = ("lstrip", "rstrip", "single_word", "normalized")
_DEFAULT_MATCH = {"lstrip": False, "rstrip": False, "single_word": False, "normalized": False}


def _token_flags(value: Any) -> dict[str, bool]:
    """The matching flags an AddedToken dict carries (none for a plain string)."""
    if not isinstance(value, dict):
        return {}
    return {k: bool(value[k]) for k in _MATCH_FLAGS if isinstance(value.get(k), bool)}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path, folder: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"corrupt tokenizer file {path.name} in {folder}: {err}") from None


def _check_vocab(vocab: Any, path: Path) -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"corrupt tokenizer file {path}: the vocabulary is not a non-empty token -> id map")
    bad = [k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise TokenizerError(f"corrupt tokenizer file {path}: non-integer ids for {bad[:5]}")
    if len(set(vocab.values())) != len(vocab):
        raise TokenizerError(f"corrupt tokenizer file {path}: several tokens share an id")
    return vocab


def _parse_merges(lines: Iterable[Any], path: Path, header: bool = False) -> list[tuple[str, str]]:
    """Ranked merges from merges.txt lines (``header``: may start with ``#version``) or tokenizer.json."""
    merges: list[tuple[str, str]] = []
    for number, item in enumerate(lines, start=1):
        if isinstance(item, str):
            if not item or (header and number == 1 and item.startswith("#version")):
                continue
            parts = item.split(" ")
        else:
            parts = item if isinstance(item, list) else None
        if parts is None or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise TokenizerError(f"corrupt tokenizer file {path}: merge {number} is not a pair of tokens: {item!r}")
        merges.append((parts[0], parts[1]))
    return merges


class CLIPTokenizer:
    """CLIP BPE tokenizer giving the same ids as transformers' ``CLIPTokenizer``."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str | None = None,
        unk_token: str | None = None,
        model_max_length: int = DEFAULT_MAX_LENGTH,
        match_flags: dict[str, dict[str, bool]] | None = None,
    ) -> None:
        """Build from a token -> id map and the ranked merges; ``pad``/``unk`` default to the end token.

        ``match_flags`` maps a special token to AddedToken options (``normalized``, ``lstrip``,
        ``rstrip``, ``single_word``) that say how it is recognised inside a text.
        """
        pad_token = eos_token if pad_token is None else pad_token
        unk_token = eos_token if unk_token is None else unk_token
        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if token not in vocab:
                raise TokenizerError(f"{name} token {token!r} is not in the vocabulary")
        if model_max_length < 2:
            raise TokenizerError(f"model_max_length must be at least 2, got {model_max_length}")
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.model_max_length = model_max_length
        specials = dict.fromkeys((bos_token, eos_token, pad_token, unk_token))
        self.match_flags = {t: {**_DEFAULT_MATCH, **(match_flags or {}).get(t, {})} for t in specials}
        try:
            self._backend = _build_backend(self.vocab, self.merges, unk_token)
        except Exception as err:  # tokenizers raises plain Exceptions for bad merges
            raise TokenizerError(f"cannot build the BPE model: {err}") from None
        # Special tokens in the text map to their ids, as in transformers.
        self._backend.add_special_tokens(
            [AddedToken(t, special=True, **flags) for t, flags in self.match_flags.items()]
        )

    # ------------------------------------------------------------------ ids
    @property
    def bos_token_id(self) -> int:
        return self.vocab[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.vocab[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.vocab[self.pad_token]

    @property
    def vocab_size(self) -> int:
        """Number of ids (special tokens included)."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens, padding or truncation."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | list[str], max_length: int | None = None) -> torch.Tensor:
        """Ids (B, max_length): start, tokens, end, then padding; long texts are cut keeping the end token."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.model_max_length if max_length is None else max_length
        if length < 2:
            raise ValueError(f"max_length must be at least 2, got {length}")
        out = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        for row, encoding in enumerate(self._backend.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.bos_token_id, *encoding.ids[: length - 2], self.eos_token_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (word ends become spaces), for inspection."""
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()

    # ------------------------------------------------------------------ files
    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Load ``tokenizer.json`` or ``vocab.json`` + ``merges.txt`` (+ optional configs) from a folder."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist")
        options: dict[str, Any] = {}
        values: dict[str, Any] = {}
        # special_tokens_map.json wins over tokenizer_config.json, as in transformers.
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            file = folder / name
            if file.is_file():
                data = _read_json(file, folder)
                if not isinstance(data, dict):
                    raise TokenizerError(f"corrupt tokenizer file {name} in {folder}: not a JSON object")
                for key in _SPECIAL_KEYS:
                    if _token_content(data.get(key)) is not None:
                        values[key] = data[key]
                max_length = data.get("model_max_length")
                if isinstance(max_length, (int, float)) and 2 <= max_length < _UNSET_MAX_LENGTH:
                    options["model_max_length"] = int(max_length)

        # One token may fill several roles (SD 1.x: end = pad = unk). Its matching flags
        # come from the last role naming it, in transformers' order, a plain string
        # meaning the defaults. This reproduces transformers 5 on SD 1.5's files (start
        # token matched after lower-casing, end token before); some other mixes of
        # flags across roles are resolved differently by transformers.
        flags: dict[str, dict[str, bool]] = {}
        for key in _SPECIAL_KEYS:
            if key in values:
                options[key] = _token_content(values[key])
            token = options.get(key, options.get("eos_token", EOS_TOKEN) if key != "bos_token" else BOS_TOKEN)
            flags[token] = _token_flags(values.get(key))

        tokenizer_json = folder / "tokenizer.json"
        vocab_json, merges_txt = folder / "vocab.json", folder / "merges.txt"
        if tokenizer_json.is_file():
            vocab, merges = cls._read_tokenizer_json(tokenizer_json, folder)
        elif vocab_json.is_file() and merges_txt.is_file():
            vocab = _check_vocab(_read_json(vocab_json, folder), vocab_json)
            try:
                lines = merges_txt.read_text(encoding="utf-8").split("\n")
            except UnicodeDecodeError as err:
                raise TokenizerError(f"corrupt tokenizer file merges.txt in {folder}: {err}") from None
            merges = _parse_merges((line.rstrip("\r") for line in lines), merges_txt, header=True)
        else:
            present = [p.name for p in (tokenizer_json, vocab_json, merges_txt) if p.is_file()]
            missing = "merges.txt" if vocab_json.is_file() else "vocab.json" if merges_txt.is_file() else (
                "vocab.json and merges.txt"
            )
            raise TokenizerError(
                f"no tokenizer in {folder}: need tokenizer.json, or vocab.json and merges.txt; "
                f"missing {missing}" + (f" (found {', '.join(present)})" if present else "")
            )
        try:
            return cls(vocab, merges, match_flags=flags, **options)
        except TokenizerError as err:
            raise TokenizerError(f"tokenizer in {folder}: {err}") from None

    @staticmethod
    def _read_tokenizer_json(path: Path, folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
        data = _read_json(path, folder)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
            raise TokenizerError(f"{path} does not hold a BPE tokenizer")
        if model.get("end_of_word_suffix") not in (None, END_OF_WORD):
            suffix = model.get("end_of_word_suffix")
            raise TokenizerError(f"{path} is not a CLIP tokenizer (end_of_word_suffix {suffix!r})")
        vocab = dict(model.get("vocab") or {})
        # Special tokens may live only among the added tokens.
        for added in data.get("added_tokens") or []:
            if isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int):
                vocab.setdefault(added["content"], added["id"])
        vocab = _check_vocab(vocab, path)
        merges = _parse_merges(model.get("merges") or [], path)
        return vocab, merges

    def save(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        specials = {
            key: {"content": token, **self.match_flags[token], "special": True}
            for key, token in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                               ("pad_token", self.pad_token), ("unk_token", self.unk_token))
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.model_max_length,
            "do_lower_case": True,
            "add_prefix_space": False,
            "errors": "replace",
            **specials,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")


def _pre_tokenize(texts: Iterable[str]) -> Counter[str]:
    """Word counts, in the byte-level alphabet, after CLIP's normalisation and split."""
    backend = _build_backend({EOS_TOKEN: 0}, [], EOS_TOKEN)
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = backend.normalizer.normalize_str(text)
        counts.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


def train_clip_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 1) -> CLIPTokenizer:
    """Train a byte-level BPE with CLIP's conventions on ``texts``.

    The vocabulary is laid out as CLIP's ``vocab.json``: the 256 byte characters, the
    same 256 with ``</w>``, one token per merge in merge order, then ``<|startoftext|>``
    and ``<|endoftext|>``. Merges are learnt greedily (most frequent adjacent pair first,
    ties broken by the smaller pair, so training is deterministic) until the vocabulary
    reaches ``vocab_size`` or no pair occurs ``min_frequency`` times.
    """
    base = list(bytes_to_unicode().values())
    if vocab_size < 2 * len(base) + 2:
        raise ValueError(f"vocab_size must be at least {2 * len(base) + 2}, got {vocab_size}")
    tokens = base + [c + END_OF_WORD for c in base]
    known = set(tokens)

    words: list[list[str]] = []
    freqs: list[int] = []
    for word, count in _pre_tokenize(texts).items():
        symbols = list(word)
        symbols[-1] += END_OF_WORD
        words.append(symbols)
        freqs.append(count)

    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for index, (symbols, count) in enumerate(zip(words, freqs)):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += count
            where.setdefault(pair, set()).add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(tokens) + 2 < vocab_size and heap:
        negative, best = heapq.heappop(heap)
        if -negative != pair_counts.get(best, 0):
            continue  # stale heap entry
        if -negative < min_frequency:
            break
        merges.append(best)
        merged = best[0] + best[1]
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
        changed: set[tuple[str, str]] = set()
        for index in where.pop(best, set()):
            symbols, count = words[index], freqs[index]
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] -= count
                changed.add(pair)
            new: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    new.append(merged)
                    i += 2
                else:
                    new.append(symbols[i])
                    i += 1
            words[index] = new
            for pair in zip(new, new[1:]):
                pair_counts[pair] += count
                where.setdefault(pair, set()).add(index)
                changed.add(pair)
        pair_counts.pop(best, None)
        for pair in changed:
            count = pair_counts.get(pair, 0)
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            else:
                pair_counts.pop(pair, None)

    vocab = {token: i for i, token in enumerate(tokens + [BOS_TOKEN, EOS_TOKEN])}
    return CLIPTokenizer(vocab, merges)

"""LoRAs named in the prompt, as AUTOMATIC1111 writes them: ``<lora:NAME:WEIGHT>``.

Syntax (A1111's extra networks)::

    <lora:NAME>               text encoder and UNet at 1
    <lora:NAME:0.7>           both at 0.7
    <lora:NAME:0.5:0.8>       text encoder 0.5, UNet 0.8
    <lora:NAME:te=0.5:unet=0.8>

``NAME`` is a file stem looked up (subfolders too) in the pipeline's ``lora_dirs``
(``.safetensors``, ``.pt``, ``.ckpt``, ``.bin``).  The tags are removed from the text before it
is encoded and kept in the infotext's prompt, as A1111 does.  The tags of every prompt and
negative prompt of a call apply to the whole call (A1111 activates a batch's extra networks
together); the same LoRA tagged with two different weights in one call is an error, since one
set of merged weights serves the batch.

A tagged LoRA is merged for the duration of the call and unmerged afterwards (bit for bit),
under the pipeline's generation lock; the LoRAs loaded with ``Pipeline.load_lora`` stay.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoints.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from ..errors import BadArgument, BadFile

if TYPE_CHECKING:
    from ..pipeline import Pipeline

#: A1111's extra-network tag: ``<kind:arg:arg...>``
TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")  # A1111 reads LyCORIS' old "lyco" tag as a LoRA
LORA_SUFFIXES = SAFETENSORS_SUFFIXES + tuple(s for s in PICKLE_SUFFIXES if s != ".pth")


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag: the name and the weights per network."""

    name: str
    text_encoder: float
    unet: float


@dataclass(frozen=True)
class PromptLora:
    """A tagged LoRA resolved to its file."""

    name: str
    path: Path
    text_encoder: float
    unet: float
    hash: str

    @property
    def state_name(self) -> str:
        """Its name among the pipeline's merged LoRAs (apart from the ones loaded by hand)."""
        return f"<lora:{self.name}>"


def strip_tags(prompt: str) -> str:
    """The prompt without its ``<lora:...>`` tags (the text the encoder sees)."""
    return TAG.sub(lambda m: "" if m.group(1) in LORA_KINDS else m.group(0), prompt)


def _weight(tag: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise BadArgument(f"{tag}: {value!r} is not a number") from None
    if not math.isfinite(number) or abs(number) > 100:
        raise BadArgument(f"{tag}: the weight must be a finite number in [-100, 100], got {value}")
    return number


def parse_tags(prompt: str) -> list[LoraTag]:
    """The ``<lora:...>`` tags of a prompt, in order; a malformed one is a BadArgument naming it.

    >>> parse_tags("a cat <lora:ink:0.5:0.8>")
    [LoraTag(name='ink', text_encoder=0.5, unet=0.8)]
    """
    tags = []
    for match in TAG.finditer(prompt):
        kind, text = match.group(1), match.group(0)
        if kind not in LORA_KINDS:
            raise BadArgument(f"{text}: latentdiff reads <lora:...> tags only, not <{kind}:...>")
        positional, named = [], {}
        for arg in match.group(2).split(":"):
            key, eq, value = arg.partition("=")
            if eq:
                if key.strip() not in ("te", "unet"):
                    raise BadArgument(f"{text}: unknown argument {key.strip()!r} (te= and unet= are known)")
                named[key.strip()] = _weight(text, value)
            else:
                positional.append(arg.strip())
        if not positional or not positional[0]:
            raise BadArgument(f"{text}: the tag names no LoRA")
        if len(positional) > 3:
            raise BadArgument(f"{text}: too many arguments (NAME[:TE[:UNET]])")
        te = named.get("te", _weight(text, positional[1]) if len(positional) > 1 else 1.0)
        unet = named.get("unet", _weight(text, positional[2]) if len(positional) > 2 else te)
        tags.append(LoraTag(positional[0], te, unet))
    return tags


def find_lora(name: str, dirs: Sequence[Path]) -> Path:
    """The LoRA file called ``name`` (its stem) in ``dirs`` or their subfolders."""
    if not dirs:
        raise BadArgument(f"the prompt uses <lora:{name}> but no LoRA folder is set (lora_dirs= / --lora-dir)")
    found: list[Path] = []
    for folder in dirs:
        if not folder.is_dir():
            raise BadFile(f"LoRA folder {folder} is not a folder")
        found += [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in LORA_SUFFIXES and p.is_file()]
    matches = [p for p in found if p.stem == name]
    if not matches:
        known = ", ".join(sorted({p.stem for p in found})[:20]) or "none"
        raise BadArgument(f"<lora:{name}>: no LoRA file named {name} in {', '.join(map(str, dirs))} (found: {known})")
    if len(matches) > 1:
        raise BadArgument(f"<lora:{name}>: several files are named {name}: {', '.join(map(str, matches))}")
    return matches[0]


def resolve_prompt_loras(texts: Iterable[str], dirs: Sequence[str | Path]) -> tuple[PromptLora, ...]:
    """The LoRAs the tags of ``texts`` ask for, found and hashed (each once)."""
    from . import lora_hash

    tags: dict[str, LoraTag] = {}
    for text in texts:
        for tag in parse_tags(text):
            seen = tags.setdefault(tag.name, tag)
            if seen != tag:
                raise BadArgument(f"<lora:{tag.name}> is tagged with two different weights in one call "
                                  f"({seen.text_encoder:g}/{seen.unet:g} and {tag.text_encoder:g}/{tag.unet:g})")
    folders = [Path(d) for d in dirs]
    resolved = []
    for tag in tags.values():
        path = find_lora(tag.name, folders)
        resolved.append(PromptLora(tag.name, path, tag.text_encoder, tag.unet, lora_hash(path)))
    return tuple(resolved)


@contextmanager
def applied(pipe: Pipeline, loras: Sequence[PromptLora]) -> Iterator[None]:
    """Merge ``loras`` for the body and unmerge them after it (re-entrant: a LoRA already
    merged by an enclosing call is left to it)."""
    added = []
    try:
        for lora in loras:
            if lora.state_name in pipe.lora_state.loaded:
                continue
            pipe.load_lora(lora.path, name=lora.state_name, unet_scale=lora.unet,
                           text_encoder_scale=lora.text_encoder, scale=lora.unet, digest=lora.hash)
            added.append(lora.state_name)
        yield
    finally:
        if added:
            pipe.unload_lora(added)  # one restore of the originals for all of them

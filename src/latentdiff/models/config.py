"""Typed model configs that read and write diffusers' ``config.json``.

Every model config is a frozen dataclass whose field names are the diffusers
(or transformers) config keys, so a ``config.json`` maps onto it one to one.
Keys that a reference library writes but latentdiff does not use (``_class_name``,
``_diffusers_version``, ...) are ignored on load; a key latentdiff does not know
is ignored too, but a *value* latentdiff cannot honour raises, in each model's
``validate``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from ..errors import BadModel

C = TypeVar("C", bound="ModelConfig")


class ConfigError(BadModel):
    """A config that latentdiff cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base class: dict/JSON round trip with diffusers-compatible keys."""

    # Written into config.json as "_class_name" so diffusers can load the folder.
    _class_name = ""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a diffusers/transformers config dict; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key in names:
                field_type = next(f.type for f in dataclasses.fields(cls) if f.name == key)
                if isinstance(value, list) and "tuple" in str(field_type):
                    value = tuple(value)
                kwargs[key] = value
        config = cls(**kwargs)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """The config as diffusers writes it (tuples become lists)."""
        out: dict[str, Any] = {"_class_name": self._class_name} if self._class_name else {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def validate(self) -> None:
        """Raise ConfigError for values this implementation cannot honour."""

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        """Read a ``config.json`` file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"missing config file: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"corrupt config file {path}: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} does not hold a JSON object")
        return cls.from_dict(data)

    def save(self, path: str | Path, **extra: Any) -> None:
        """Write ``config.json`` (plus any ``extra`` keys, e.g. ``_diffusers_version``)."""
        data = self.to_dict()
        data.update(extra)
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

"""Typed model configs that read and write diffusers' ``config.json``.

Every model config is a frozen dataclass whose field names are the diffusers
(or transformers) config keys, so a ``config.json`` maps onto it one to one.
Keys that a reference library writes but latentdiff does not use (``_class_name``,
``_diffusers_version``, ...) are ignored on load; a key latentdiff does not know
is ignored too. A known key's *type* is checked against the field's annotation
when the config is read (:meth:`ModelConfig.from_dict`); a value of the right type
that latentdiff cannot honour raises in each model's ``validate``. Both errors
name the field and, when the config came from a file, the file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

from ..errors import BadModel
from ..jsonfile import read_json_object

C = TypeVar("C", bound="ModelConfig")


class ConfigError(BadModel):
    """A config that latentdiff cannot build a model from."""


def config_error(message: str, source: str | Path | None) -> ConfigError:
    """A ConfigError whose message starts with the config's file (or other origin), when known."""
    return ConfigError(f"{source}: {message}" if source else message)


class _Mismatch(Exception):
    """Raised by :func:`_coerce` for a value that does not fit a type hint."""


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """The evaluated annotations of a config dataclass's fields."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _describe(hint: Any) -> str:
    """A type hint in words: "an integer", "a list of 2 integers", "a number or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0])}" if len(set(args)) == 1 else "a list"
    words = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "null"}
    if hint in words:
        return words[hint]
    return f"a {getattr(hint, '__name__', hint)}"


def _plural(hint: Any) -> str:
    words = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
    return words.get(hint, _describe(hint))


def _shown(value: Any) -> str:
    """A JSON value as it appears in a message: type and (shortened) repr."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}.get(type(value))
    if kind is None:
        kind = "list" if isinstance(value, (list, tuple)) else type(value).__name__
    return f"{kind} {text}"


def _coerce(value: Any, hint: Any, source: str | Path | None) -> Any:
    """``value`` if it fits ``hint`` (JSON lists become tuples), else raise _Mismatch.

    Strict like JSON types: a bool is not an integer, a float is not an integer (an
    integer is a number), floats must be finite, and strings are not lists.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, source)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], source) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a, source) for v, a in zip(value, args))
    if hint is type(None):
        if value is not None:
            raise _Mismatch
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Mismatch
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    if isinstance(hint, type) and issubclass(hint, ModelConfig):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch
        return hint.from_dict(dict(value), source=source)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _Mismatch
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base class: dict/JSON round trip with diffusers-compatible keys."""

    # Written into config.json as "_class_name" so diffusers can load the folder.
    _class_name = ""

    @classmethod
    def checked_fields(cls, data: Mapping[str, Any], source: str | Path | None = None) -> dict[str, Any]:
        """The entries of ``data`` that are fields of this config, type-checked against their annotations.

        Unknown keys are dropped; JSON lists become tuples. A value of the wrong type raises
        ConfigError naming the field, what it must be and ``source`` (the config file).
        """
        hints = _field_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in hints:
                continue
            try:
                kwargs[key] = _coerce(value, hints[key], source)
            except _Mismatch:
                raise config_error(
                    f"{cls.__name__}.{key} must be {_describe(hints[key])}, got {_shown(value)}", source
                ) from None
        return kwargs

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], source: str | Path | None = None) -> C:
        """Build from a diffusers/transformers config dict; unknown keys are ignored.

        ``source`` (the config file, or where the dict came from) is named in every error.
        """
        return cls.build_checked(cls.checked_fields(data, source), source)

    @classmethod
    def build_checked(cls: type[C], kwargs: dict[str, Any], source: str | Path | None = None) -> C:
        """Construct from type-checked fields and validate, naming ``source`` in a ConfigError."""
        try:
            config = cls(**kwargs)
            config.validate()
        except ConfigError as err:
            if source and not str(err).startswith(f"{source}: "):
                raise config_error(str(err), source) from None
            raise
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
        """Read a ``config.json`` file; every error names it."""
        path = Path(path)
        return cls.from_dict(read_json_object(path, ConfigError), source=path)

    def save(self, path: str | Path, **extra: Any) -> None:
        """Write ``config.json`` (plus any ``extra`` keys, e.g. ``_diffusers_version``)."""
        data = self.to_dict()
        data.update(extra)
        Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

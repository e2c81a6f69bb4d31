"""Reading a JSON object from a file, with one-line errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import BadFile, UserError

__all__ = ["read_json_object"]


def read_json_object(path: str | Path, error: type[UserError] = BadFile) -> dict[str, Any]:
    """The JSON object held by ``path``; anything else raises ``error`` naming the file.

    Missing, unreadable, non-UTF-8, malformed (including nested too deeply to parse) and
    non-object JSON files are all refused with one line saying which.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"missing file: {path}") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, expected a JSON file") from None
    except UnicodeDecodeError as err:
        raise error(f"corrupt JSON in {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except ValueError as err:  # JSONDecodeError, or an integer too long to convert
        raise error(f"corrupt JSON in {path}: {err}") from None
    except RecursionError:
        raise error(f"corrupt JSON in {path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object (found a JSON {_json_kind(data)})")
    return data


def _json_kind(value: Any) -> str:
    """How JSON names the type of a parsed value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"

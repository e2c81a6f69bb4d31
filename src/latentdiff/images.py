"""Image files as input, and output paths, checked before any work is done.

:func:`open_image` reads an image the user names (an init image, a mask) safely: the
size in the header is checked against a pixel budget *before* any pixel is decoded,
so a small file claiming 20000 x 20000 pixels (a decompression bomb) costs nothing;
unreadable, truncated and not-an-image files are refused with one line.

:func:`check_output_path` refuses an output path that cannot be written (missing or
read-only folder, a directory, a device such as ``/dev/full``) before minutes of
generation, instead of failing at the end.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import BadFile

__all__ = ["check_output_path", "image_from_bytes", "open_image"]

# Formats PIL may open. EPS is left out: PIL decodes it by running Ghostscript.
_EXCLUDED_FORMATS = frozenset({"EPS"})

# What PIL's decoders raise for broken data (on top of OSError), found by fuzzing.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError, KeyError)

_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in Image.OPEN if f not in _EXCLUDED_FORMATS)


def open_image(path: str | Path, *, what: str = "image", max_pixels: int) -> Image.Image:
    """Open ``path`` as a fully decoded ``RGB`` (colour) or ``L`` (grey) image.

    The header is read first, and an image of more than ``max_pixels`` pixels is refused
    before decoding. A missing file, a directory, a file that is not an image, a truncated
    or corrupt one, and PIL's decompression-bomb errors and warnings raise
    :class:`~latentdiff.errors.BadFile` naming ``what`` and the path. Alpha is dropped;
    16-bit grey is scaled to 8 bits.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BadFile(f"{what} {path} does not exist") from None
    except OSError as err:
        raise BadFile(f"cannot read {what} {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(mode):
        raise BadFile(f"{what} {path} is a directory, expected an image file")
    if not stat.S_ISREG(mode):
        raise BadFile(f"{what} {path} is not a regular file (a device, pipe or socket)")
    return _decode(path, f"{what} {path}", max_pixels)


def image_from_bytes(data: bytes, *, what: str = "image", max_pixels: int) -> Image.Image:
    """:func:`open_image` for an image held in memory (an upload): the same checks and errors."""
    return _decode(io.BytesIO(data), what, max_pixels)


def _decode(source: str | Path | io.BytesIO, label: str, max_pixels: int) -> Image.Image:
    """Open ``source`` (named ``label`` in errors), check its size from the header, decode it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source, formats=_formats())
    except Image.UnidentifiedImageError:
        raise BadFile(f"{label} is not an image (or not in a format PIL reads)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _bomb(label, err, max_pixels) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        raise BadFile(f"cannot read {label}: {err.strerror or err}") from None
    except _DECODE_ERRORS as err:
        raise BadFile(f"{label} is corrupt: {_first_line(err)}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise BadFile(
                f"{label} is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}"
            )
        if width * height == 0:
            raise BadFile(f"{label} is empty ({width}x{height} pixels)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
                return _rgb_or_l(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _bomb(label, err, max_pixels) from None
        except _DECODE_ERRORS as err:
            raise BadFile(f"{label} is truncated or corrupt: {_first_line(err)}") from None


def _bomb(label: str, err: Exception, max_pixels: int) -> BadFile:
    """PIL's decompression-bomb error or warning (which give the pixel count) as a BadFile."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    if found and int(found[1]) > max_pixels:  # over our own budget too: say so, as for smaller images
        return BadFile(f"{label} is {found[1]} pixels, more than the limit of {max_pixels}")
    reason = str(err).removesuffix(", could be decompression bomb DOS attack.").rstrip(".")
    return BadFile(
        f"{label} is refused as a possible decompression bomb: {reason} (PIL's limit; "
        f"latentdiff's is {max_pixels} pixels)"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _rgb_or_l(image: Image.Image) -> Image.Image:
    """A copy in mode ``RGB`` or ``L`` (alpha dropped, 16-bit grey scaled, palettes expanded)."""
    mode = image.mode
    if mode in ("RGB", "L"):
        return image.copy()
    if mode in _SIXTEEN_BIT:
        grey = np.asarray(image, dtype=np.float64)
        if mode != "I" or grey.max(initial=0) > 255:
            grey = grey / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), mode="L")
    if mode in ("1", "LA", "La"):
        return image.convert("L")
    if mode == "P":
        return image.convert("RGBA").convert("RGB") if "transparency" in image.info else image.convert("RGB")
    if mode == "PA":
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def check_output_path(path: str | Path) -> Path:
    """``path`` as a Path, if a file can be written there; else BadFile naming it.

    Its folder must exist and be writable; the name must not be a directory or a special
    file such as ``/dev/full`` (anything that exists and is not a regular file).
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise BadFile(f"output path {str(path)!r} names a folder, expected a file name")
    parent = path.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise BadFile(f"output path {path}: its folder {parent} {what}")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise BadFile(f"output path {path} cannot be used: {err.strerror or err}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise BadFile(f"output path {path} is a directory, expected a file name")
    if mode is not None and not stat.S_ISREG(mode):
        raise BadFile(f"output path {path} exists and is not a regular file (a device, pipe or socket)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadFile(f"output path {path}: its folder {parent} is not writable")
    return path

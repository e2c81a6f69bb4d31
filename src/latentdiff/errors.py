"""The errors a user's input can cause.

Everything latentdiff raises for bad input derives from :class:`UserError`; the CLI prints one
of these as a single line and exits with status 2.  Any other exception is a bug and keeps its
traceback.  Each class also derives from the built-in type code would naturally catch
(``ValueError``, ``MemoryError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["UserError", "BadArgument", "BadFile", "BadModel", "OutOfBudget"]


class UserError(Exception):
    """Bad input from the user: a clear, one-line message naming the problem."""


class BadArgument(UserError, ValueError):
    """An argument of the wrong type or outside its domain (named in the message)."""


class BadFile(UserError, ValueError):
    """An input or output file that cannot be used: missing, unreadable, not an image, too large."""


class BadModel(UserError, ValueError):
    """A model file or folder that latentdiff cannot load: wrong keys, shapes, dtypes, values, config."""


class OutOfBudget(UserError, MemoryError):
    """Work that would need more memory (or pixels) than the budget allows."""

"""The one error type for problems a user can fix: bad input, missing weights, a refused cache.

The CLI prints a UserError as one line; anything else is a bug and is reported with its traceback.
It subclasses ValueError so callers that already expect ValueError for a bad choice keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; str() is one line naming the file or option and the problem."""


def one_line(err: BaseException) -> str:
    """'Type: first line of the message' ('Type' alone when there is none), for one-line errors and skip reasons."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def flattened(text: str) -> str:
    """`text` on one line: every run of whitespace, newlines included, becomes one space."""
    return " ".join(text.split())


def message_of(err: BaseException) -> str:
    """An error's whole message on one line (its type's name when it has none): what the CLI, serve and the
    benchmark report."""
    return flattened(str(err)) or type(err).__name__

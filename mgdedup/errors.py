"""Errors a user can cause and fix, as opposed to bugs.

The CLI prints these as one line and exits with code 1; anything else is a bug and keeps its
traceback.
"""


class MgdedupError(Exception):
    """A user-facing problem: a missing folder, a corrupt model file, an index of another model."""


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (its type name when it has none): what a
    one-line error or a report entry quotes."""
    return " ".join(str(error).split()) or type(error).__name__


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when empty), at most `limit`
    characters: enough to say what a library refused, without its multi-line detail."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]

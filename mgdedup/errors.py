"""Errors a user can cause and fix, as opposed to bugs.

The CLI prints these as one line and exits with code 1; anything else is a bug and keeps its
traceback.
"""


class MgdedupError(Exception):
    """A user-facing problem: a missing folder, a corrupt model file, an index of another model."""

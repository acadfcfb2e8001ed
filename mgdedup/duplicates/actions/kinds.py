"""What `dedup --action` can do to a duplicate (kept apart so the CLI can name the choices
without importing the machinery of `mgdedup.duplicates.actions`)."""

from __future__ import annotations

from enum import Enum

#: the kind of a planned step that will not be done (its reason says why)
SKIP = "skip"


class Action(str, Enum):
    MOVE = "move"
    HARDLINK = "hardlink"
    SYMLINK = "symlink"
    DELETE = "delete"

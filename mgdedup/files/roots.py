"""The folders (or files) a user names for `index`, checked before anything heavy is imported:
a typo answers in a fraction of a second, with the error the scan itself would give."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mgdedup.errors import MgdedupError


def check_roots(roots: Sequence[Path]) -> None:
    """Refuse a root that does not exist or is neither a folder nor a file. A dangling
    symbolic link passes: the scan reports it as a problem of that file and goes on."""
    for given in roots:
        given = Path(given).expanduser()
        if not given.exists():
            if given.is_symlink():
                continue
            raise MgdedupError(f"no such folder: {given}")
        if not (given.is_dir() or given.is_file()):
            raise MgdedupError(f"not a folder or a file: {given}")

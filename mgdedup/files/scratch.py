"""Scratch folders for work files (the edited copies calibration embeds) that never pile up:
each is named after the process that made it, removed when that process is done, and removed
by the next one when a killed process could not."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale(parent: Path, prefix: str) -> int:
    """Remove `prefix`-PID-* folders below `parent` whose process is gone; returns how many."""
    removed = 0
    try:
        entries = list(parent.iterdir())
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not name.startswith(prefix + "-") or not entry.is_dir() or entry.is_symlink():
            continue
        pid = name[len(prefix) + 1:].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d scratch folders left by killed runs in %s", removed, parent)
    return removed


@contextmanager
def scratch_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh folder ``parent/PREFIX-PID-XXXXXXXX``, removed on leaving the block; stale
    ones of killed runs are removed first. A `parent` that cannot be written (a read-only
    index folder) falls back to the system's temporary folder."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale(parent, prefix)
        folder = parent / f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        folder.mkdir()
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix=f"mgdedup-{prefix}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)

"""Finding the index a command should use, so `index ~/photos` then `dedup` just works.

Order: `--index` wins; else an index in the current directory; else the most recently written
index, remembered in the user's config directory (XDG on Linux).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mgdedup.errors import MgdedupError

log = logging.getLogger(__name__)

INDEX_DIRNAME = ".mgdedup"
H5_NAME = "embeddings.h5"
FAISS_NAME = "faiss.index"
ERRORS_NAME = "errors.jsonl"


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mgdedup"


def _last_index_file() -> Path:
    return config_dir() / "last-index"


def remember_index(index_dir: Path) -> None:
    """Best effort: a read-only home must not fail an indexing run."""
    try:
        target = _last_index_file()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(str(Path(index_dir).resolve()) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError as error:
        log.debug("could not remember the index location: %s", error)


def _as_index_dir(candidate: Path) -> Path | None:
    if candidate.is_file() and candidate.name == H5_NAME:
        return candidate.parent
    if (candidate / H5_NAME).is_file():
        return candidate
    if (candidate / INDEX_DIRNAME / H5_NAME).is_file():
        return candidate / INDEX_DIRNAME
    return None


def find_index(explicit: Path | None = None, cwd: Path | None = None) -> Path:
    """The index directory to read, or a one-line MgdedupError saying how to make one."""
    if explicit is not None:
        found = _as_index_dir(Path(explicit).expanduser())
        if found is None:
            raise MgdedupError(f"no mgdedup index at {explicit} (expected {H5_NAME} there)")
        return found.resolve()
    found = _as_index_dir(Path(cwd or Path.cwd()))
    if found is not None:
        return found.resolve()
    try:
        remembered = Path(_last_index_file().read_text(encoding="utf-8").strip())
    except OSError:
        remembered = None
    if remembered is not None:
        found = _as_index_dir(remembered)
        if found is not None:
            return found.resolve()
    raise MgdedupError("no index found: run `mgdedup index FOLDER` first, or pass --index")


def default_index_dir(roots: list[Path]) -> Path:
    """`.mgdedup/` inside the first indexed folder (its parent when it is a single file)."""
    first = Path(roots[0]).expanduser().resolve()
    return (first.parent if first.is_file() else first) / INDEX_DIRNAME

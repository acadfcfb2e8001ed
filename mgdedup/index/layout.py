"""The index folder: the one place that names its files, and how a command finds it.

An index folder (``.mgdedup/`` inside the first indexed folder unless ``--out`` says
otherwise) holds:

==================  ================================================================
``embeddings.h5``   the rows, source of truth (`mgdedup.index.store`)
``faiss.index``     search structure rebuilt from the rows (`mgdedup.index.faiss_index`)
``errors.jsonl``    files that could not be read, with the reason
``calibration.json`` precision curves of `mgdedup calibrate` (`mgdedup.duplicates.precision`)
``decisions.json``  a person's verdicts on pairs (`mgdedup.duplicates.decisions`)
``verified.npz``    verification of candidate pairs, kept between runs (a cache:
                    `mgdedup.duplicates.evidence_cache`)
``candidates.npz``  candidate pairs and their copy scores, kept between runs (a cache:
                    `mgdedup.duplicates.pair_cache`)
``actions/``        manifests of applied actions, for `mgdedup undo`
``trash/``          bytes of deleted or linked duplicates, until undone or emptied
``lock``            held by the one writer (`mgdedup.index.lock`)
``tmp/``            work files of running commands, removed when they end
==================  ================================================================

Finding it: ``--index`` wins; else an index in the current directory; else the most recently
written index, remembered in the user's config directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import write_text
from mgdedup.files.user_dirs import config_dir

if TYPE_CHECKING:  # h5py is heavy: imported only when a store is opened
    from mgdedup.index.store import IndexStore

log = logging.getLogger(__name__)

INDEX_DIRNAME = ".mgdedup"


@dataclass(frozen=True)
class IndexDir:
    """Paths of one index folder's files (nothing is read or created by naming them)."""

    path: Path

    EMBEDDINGS = "embeddings.h5"
    FAISS = "faiss.index"
    ERRORS = "errors.jsonl"
    CALIBRATION = "calibration.json"
    DECISIONS = "decisions.json"
    VERIFIED = "verified.npz"
    CANDIDATES = "candidates.npz"
    ACTIONS = "actions"
    TRASH = "trash"
    LOCK = "lock"
    SCRATCH = "tmp"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def embeddings(self) -> Path:
        return self.path / self.EMBEDDINGS

    @property
    def faiss(self) -> Path:
        return self.path / self.FAISS

    @property
    def errors(self) -> Path:
        return self.path / self.ERRORS

    @property
    def calibration(self) -> Path:
        return self.path / self.CALIBRATION

    @property
    def decisions(self) -> Path:
        return self.path / self.DECISIONS

    @property
    def verified(self) -> Path:
        return self.path / self.VERIFIED

    @property
    def candidates(self) -> Path:
        return self.path / self.CANDIDATES

    @property
    def actions(self) -> Path:
        return self.path / self.ACTIONS

    @property
    def trash(self) -> Path:
        return self.path / self.TRASH

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def scratch(self) -> Path:
        """Work files of a running command (`mgdedup.files.scratch`)."""
        return self.path / self.SCRATCH

    def exists(self) -> bool:
        return self.embeddings.is_file()

    def open_store(self, mode: str = "r") -> IndexStore:
        """The rows, read-only ("r") or appendable ("a")."""
        from mgdedup.index.store import IndexStore

        return IndexStore.open(self.embeddings, mode)


def _last_index_file() -> Path:
    return config_dir() / "last-index"


def remember_index(index_dir: Path) -> None:
    """Best effort: a read-only home must not fail an indexing run."""
    try:
        write_text(_last_index_file(), str(Path(index_dir).resolve()) + "\n")
    except MgdedupError as error:
        log.debug("could not remember the index location: %s", error)


def _as_index_dir(candidate: Path) -> Path | None:
    if candidate.is_file() and candidate.name == IndexDir.EMBEDDINGS:
        return candidate.parent
    if IndexDir(candidate).exists():
        return candidate
    if IndexDir(candidate / INDEX_DIRNAME).exists():
        return candidate / INDEX_DIRNAME
    return None


def find_index(explicit: Path | None = None, cwd: Path | None = None) -> Path:
    """The index directory to read, or a one-line MgdedupError saying how to make one."""
    if explicit is not None:
        found = _as_index_dir(Path(explicit).expanduser())
        if found is None:
            raise MgdedupError(f"no mgdedup index at {explicit} (expected "
                               f"{IndexDir.EMBEDDINGS} there)")
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

"""A person's verdicts on pairs ("not a duplicate", "a duplicate") and keeper choices, kept
with the index.

Stored in `IDX/decisions.json` as absolute resolved paths, so they survive re-indexing and
are honoured by every later `dedup`: a "not-duplicate" pair is never grouped, a "duplicate"
pair is grouped whatever its similarity, a file in "keeper" is kept in its group before any
keeper rule is asked. The latest verdict on a pair wins; choosing a keeper drops the earlier
choice among the same group's files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mgdedup.errors import MgdedupError, one_line
from mgdedup.files.atomic import write_text
from mgdedup.files.names import json_text
from mgdedup.index.layout import IndexDir

VERDICTS = ("duplicate", "not-duplicate")


@dataclass
class Decisions:
    duplicate: set[frozenset[str]] = field(default_factory=set)
    not_duplicate: set[frozenset[str]] = field(default_factory=set)
    keepers: set[str] = field(default_factory=set)

    def mark(self, verdict: str, a: str, b: str) -> None:
        pair = frozenset((a, b))
        if verdict not in VERDICTS:
            raise MgdedupError(f"unknown verdict '{verdict}' (use {' or '.join(VERDICTS)})")
        if len(pair) != 2:
            raise MgdedupError("a pair needs two different files")
        self.duplicate.discard(pair)
        self.not_duplicate.discard(pair)
        (self.duplicate if verdict == "duplicate" else self.not_duplicate).add(pair)

    def choose_keeper(self, keeper: str, group: Sequence[str] = ()) -> None:
        """Keep `keeper`; an earlier choice of another file of its group is dropped."""
        if not keeper:
            raise MgdedupError("a keeper needs a path")
        self.keepers.difference_update(group)
        self.keepers.add(keeper)

    def __len__(self) -> int:
        return len(self.duplicate) + len(self.not_duplicate)


def load_decisions(index_dir: Path) -> Decisions:
    path = IndexDir(index_dir).decisions
    if not path.exists():
        return Decisions()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MgdedupError(f"cannot read {path}: {one_line(error)}") from None
    if not isinstance(data, dict):
        raise MgdedupError(f"{path} is not a decisions file (expected an object with "
                           "\"duplicate\" and \"not-duplicate\" lists)")
    keepers = data.get("keeper", [])
    if not (isinstance(keepers, list) and all(isinstance(p, str) and p for p in keepers)):
        raise MgdedupError(f"{path}: \"keeper\" must be a list of paths")
    return Decisions(duplicate=_pairs(data, "duplicate", path),
                     not_duplicate=_pairs(data, "not-duplicate", path), keepers=set(keepers))


def _pairs(data: dict, verdict: str, path: Path) -> set[frozenset[str]]:
    """The pairs of one verdict: each exactly two different paths (a hand-edited file gets a
    one-line error naming what is wrong, never a misread verdict)."""
    entries = data.get(verdict, [])
    if not isinstance(entries, list):
        raise MgdedupError(f"{path}: \"{verdict}\" must be a list of path pairs")
    pairs = set()
    for number, entry in enumerate(entries, start=1):
        if not (isinstance(entry, list) and len(entry) == 2
                and all(isinstance(p, str) and p for p in entry) and entry[0] != entry[1]):
            raise MgdedupError(f"{path}: \"{verdict}\" entry {number} is not a pair of two "
                               "different paths")
        pairs.add(frozenset(entry))
    return pairs


def save_decisions(index_dir: Path, decisions: Decisions) -> None:
    """Atomic write: a crash never leaves half a file of verdicts."""
    data = {"duplicate": sorted(sorted(p) for p in decisions.duplicate),
            "not-duplicate": sorted(sorted(p) for p in decisions.not_duplicate),
            "keeper": sorted(decisions.keepers)}
    write_text(IndexDir(index_dir).decisions,
               json_text(data, indent=1) + "\n", "decisions")


def apply_decisions(decisions: Decisions, paths: list[str], i: np.ndarray, j: np.ndarray,
                    scores: np.ndarray, similarity) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop "not-duplicate" pairs from (i, j, scores) and add "duplicate" pairs with their
    true similarity (`similarity(a, b)` for rows a, b)."""
    if not len(decisions):
        return i, j, scores
    row_of = {path: row for row, path in enumerate(paths)}
    banned = {tuple(sorted((row_of[a], row_of[b]))) for a, b in map(tuple, decisions.not_duplicate)
              if a in row_of and b in row_of}
    keep = np.array([(int(a), int(b)) not in banned for a, b in zip(i, j)], dtype=bool)
    i, j, scores = i[keep], j[keep], scores[keep]
    present = set(zip(i.tolist(), j.tolist()))
    extra = [tuple(sorted((row_of[a], row_of[b]))) for a, b in map(tuple, decisions.duplicate)
             if a in row_of and b in row_of]
    extra = [pair for pair in extra if pair not in present]
    if extra:
        i = np.concatenate([i, np.array([a for a, _ in extra], dtype=i.dtype)])
        j = np.concatenate([j, np.array([b for _, b in extra], dtype=j.dtype)])
        scores = np.concatenate([scores, np.array([similarity(a, b) for a, b in extra],
                                                  dtype=scores.dtype)])
    return i, j, scores

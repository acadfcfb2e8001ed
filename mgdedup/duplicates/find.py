"""Duplicate groups of an index: blocked range search, then stars around keepers."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgdedup.duplicates.decisions import apply_decisions, load_decisions
from mgdedup.duplicates.grouping import Group, keeper_order, star_groups
from mgdedup.duplicates.report_text import FileFacts
from mgdedup.duplicates.score_norm import ScoreNorm, collection_background, normalise
from mgdedup.errors import MgdedupError
from mgdedup.index.faiss_index import ensure_index, range_pairs
from mgdedup.index.layout import IndexDir
from mgdedup.index.store import IndexStore
from mgdedup.model.multigrain import DEFAULT_THRESHOLD

log = logging.getLogger(__name__)

#: precision meant when normalised scores need a threshold and none was asked for: the
#: measured cosine default is the p99 threshold too (BENCHMARKS.md)
DEFAULT_TARGET_PRECISION = 0.99


@dataclass
class DedupResult:
    threshold: float
    groups: list[Group]
    facts: list[FileFacts]  # per index row
    #: "threshold" (given), "measured" (stored with the index's model), "default" (generic),
    #: "precision" (calibrated for `target_precision`)
    threshold_source: str = "threshold"
    target_precision: float | None = None
    score_norm: ScoreNorm | None = None  # scores are SSCD-normalised when set

    @property
    def duplicate_count(self) -> int:
        return sum(len(group.members) for group in self.groups)

    @property
    def reclaimable_bytes(self) -> int:
        return sum(self.facts[row].size for group in self.groups for row, _ in group.members)


def file_facts(store: IndexStore) -> list[FileFacts]:
    paths = store.absolute_paths()
    widths, heights, sizes = store.read("width"), store.read("height"), store.read("size")
    return [FileFacts(str(path), int(w), int(h), int(s))
            for path, w, h, s in zip(paths, widths, heights, sizes)]


def choose_threshold(index_dir: Path, threshold: float | None, precision: float | None,
                     score_norm: ScoreNorm | None,
                     on_calibrate: Callable[[str], None] | None = None,
                     **calibrate_options: object) -> tuple[float, str, float | None]:
    """(threshold, source, target precision) for a dedup run.

    --threshold wins; --precision reads the stored calibration of the scoring mode (running
    it when missing or stale); otherwise cosine scores use the threshold measured for the
    model, and normalised scores (another scale) the calibrated one at precision 0.99.
    """
    if threshold is not None and precision is not None:
        raise MgdedupError("give --threshold or --precision, not both")
    if threshold is not None:
        return float(threshold), "threshold", None
    if precision is None and score_norm is None:
        with IndexDir(index_dir).open_store() as store:
            measured = store.meta.threshold
        if measured is not None:
            return float(measured), "measured", None
        return DEFAULT_THRESHOLD, "default", None
    from mgdedup.duplicates.precision import ensure_calibration

    target = DEFAULT_TARGET_PRECISION if precision is None else float(precision)
    if not 0.0 < target < 1.0:
        raise MgdedupError(f"--precision must be between 0 and 1 (exclusive), got {target:g}")
    calibration = ensure_calibration(Path(index_dir), score_norm, on_calibrate=on_calibrate,
                                     **calibrate_options)
    found = calibration.threshold_for(target)
    if found is None:
        best = max((p for _, p, r in calibration.curve if r > 0), default=0.0)
        raise MgdedupError(f"precision {target:g} is not reached on this collection (at best "
                           f"{best:.3f} estimated); ask for less, or pass --threshold")
    return found[0], "precision", target


def find_duplicates(index_dir: Path, threshold: float | None = None,
                    block_rows: int = 16384, *, precision: float | None = None,
                    score_norm: ScoreNorm | None = None,
                    on_calibrate: Callable[[str], None] | None = None,
                    **calibrate_options: object) -> DedupResult:
    """Every member of a group scores >= threshold with its group's keeper, except pairs a
    person marked as duplicates; pairs marked "not-duplicate" never group.

    The score is the cosine similarity, or with `score_norm` the SSCD-normalised one
    (`mgdedup.duplicates.score_norm`: the collection is its own background). The threshold
    is chosen by
    `choose_threshold` (given, measured, or calibrated for `precision`; extra keyword
    options go to `mgdedup.duplicates.precision.calibrate_index` when it has to run).
    """
    threshold, source, target = choose_threshold(index_dir, threshold, precision, score_norm,
                                                 on_calibrate, **calibrate_options)
    with IndexDir(index_dir).open_store() as store:
        index = ensure_index(Path(index_dir), store)
        if score_norm is None:
            background = None
            i, j, scores = range_pairs(index, store.iter_embeddings(block_rows), threshold)
        else:
            background = collection_background(index, store.iter_embeddings(block_rows),
                                               score_norm)
            i, j, scores = _normalised_pairs(index, store, background, score_norm, threshold,
                                             block_rows)
        # scores as the rows say, never as the search structure (a cache) says
        i, j, scores = _rescored(store, i, j, background, score_norm, threshold)
        facts = file_facts(store)
        i, j, scores = _without_same_files(facts, i, j, scores)

        def similarity(a: int, b: int) -> float:
            rows = store.embeddings(a, a + 1), store.embeddings(b, b + 1)
            score = float(rows[0][0] @ rows[1][0])
            if background is not None and score_norm is not None:
                score = float(normalise(np.float32(score), background[a], background[b],
                                        score_norm))
            return score

        i, j, scores = apply_decisions(load_decisions(index_dir), [f.path for f in facts],
                                       i, j, scores, similarity)
    order = keeper_order(pixels=[f.width * f.height for f in facts],
                         sizes=[f.size for f in facts], paths=[f.path for f in facts])
    groups = star_groups(len(facts), i, j, scores, order)
    return DedupResult(threshold=threshold, groups=groups, facts=facts, threshold_source=source,
                       target_precision=target, score_norm=score_norm)


def _normalised_pairs(index, store: IndexStore, background: np.ndarray, norm: ScoreNorm,
                      threshold: float, block_rows: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs whose normalised score is >= threshold.

    s' >= t needs s >= t + beta (bg_i + bg_j) / 2 >= t + beta min(bg): one exact range search
    at that cosine, then the exact filter. A few images with an unusually low background
    make the search radius (and the candidate pairs) larger, never the result wrong.
    """
    if not len(background):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    radius = float(threshold) + norm.beta * float(background.min()) if norm.beta >= 0 else \
        float(threshold) + norm.beta * float(background.max())
    radius = min(radius, 1.0)
    i, j, raw = range_pairs(index, store.iter_embeddings(block_rows), radius)
    scores = normalise(raw, background[i], background[j], norm)
    keep = scores >= np.float32(threshold)
    return i[keep], j[keep], scores[keep]


def _rescored(store: IndexStore, i: np.ndarray, j: np.ndarray, background: np.ndarray | None,
              norm: ScoreNorm | None, threshold: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, score) with every score recomputed from the HDF5 rows (the source of truth),
    keeping the pairs that still reach the threshold: a damaged or altered faiss.index can
    then cost candidates, never report a pair at a score it does not have."""
    if not len(i):
        return i, j, np.zeros(0, np.float32)
    rows = np.unique(np.concatenate([i, j]))
    vectors = np.asarray(store.read("embeddings", rows), np.float32)
    position = {int(r): k for k, r in enumerate(rows.tolist())}
    a = vectors[[position[int(r)] for r in i.tolist()]]
    b = vectors[[position[int(r)] for r in j.tolist()]]
    scores = np.einsum("ij,ij->i", a, b).astype(np.float32)
    if background is not None and norm is not None:
        scores = normalise(scores, background[i], background[j], norm)
    keep = scores >= np.float32(threshold)
    return i[keep], j[keep], scores[keep]


def _without_same_files(facts: list[FileFacts], i: np.ndarray, j: np.ndarray,
                        scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop pairs of two paths to ONE file (same device and inode: a hard link, a folder
    indexed twice through a bind mount): deleting one as the other's duplicate would delete
    both. Only the rows of pairs are stat'ed."""
    if not len(i):
        return i, j, scores
    identity: dict[int, tuple[int, int] | None] = {}
    for row in np.unique(np.concatenate([i, j])).tolist():
        try:
            st = os.stat(facts[row].path)
            identity[row] = (st.st_dev, st.st_ino)
        except OSError:
            identity[row] = None
    keep = np.array([identity[a] is None or identity[a] != identity[b]
                     for a, b in zip(i.tolist(), j.tolist())], dtype=bool)
    if not keep.all():
        log.info("%d pairs of paths to the same file left out", int((~keep).sum()))
    return i[keep], j[keep], scores[keep]

"""Copy decisions: candidates, verification, the copy score, and groups of one image each.

1. Candidates (`mgdedup.duplicates.candidates`): each image's nearest neighbours by
   descriptor and its perceptual-hash neighbours, with their global signals.
2. Verification (`mgdedup.duplicates.local_match`): local features and a homography per
   candidate pair, on every core.
3. The copy score (`mgdedup.duplicates.copy_score`): P(copy) of each pair.
4. Groups: the connected components of the pairs scoring at least the threshold, so that a
   thumbnail and a screenshot of one photo land in its group even when they match only it.
   The keeper is chosen by the keeper rule; each member's score is the weakest link on its
   strongest path to the keeper (its own pair's score when it has one), and its cosine to
   the keeper is reported beside it.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgdedup.duplicates.candidates import Candidates, find_candidates
from mgdedup.duplicates.copy_score import CopyScorer, pair_features
from mgdedup.duplicates.grouping import Group
from mgdedup.duplicates.local_match import Evidence, EvidenceRows, verify_pairs
from mgdedup.errors import MgdedupError
from mgdedup.index.store import IndexStore

log = logging.getLogger(__name__)


@dataclass
class ScoredPairs:
    candidates: Candidates
    evidence: Sequence[Evidence]  # EvidenceRows where a cache was used
    probability: np.ndarray  # float32, one per candidate pair

    @property
    def i(self) -> np.ndarray:
        return self.candidates.i

    @property
    def j(self) -> np.ndarray:
        return self.candidates.j


def score_collection(store: IndexStore, index, scorer: CopyScorer, paths: list[str], *,
                     block_rows: int = 16384, workers: int | None = None,
                     cache: Path | None = None, pairs_cache: Path | None = None,
                     search_file: Path | None = None,
                     on_start: Callable[[int], None] | None = None,
                     on_progress: Callable[[int], None] | None = None) -> ScoredPairs:
    """Every candidate pair of an index with its evidence and copy score.

    `index` is the search index, or a function giving it (called only when the candidates
    must be searched). With `pairs_cache` (``IDX/candidates.npz``,
    `mgdedup.duplicates.pair_cache`; `search_file` is the saved search index it depends
    on) the candidates and scores of unchanged rows are taken from an earlier run."""
    from mgdedup.duplicates import pair_cache as pairs_file
    from mgdedup.duplicates.candidates import settings as candidate_settings

    key = pairs_file.rows_key(store, search_file, candidate_settings()) \
        if pairs_cache is not None and search_file is not None else None
    cached = pairs_file.load(pairs_cache, key, len(store)) if key is not None else None
    candidates = cached.candidates if cached is not None else None
    if candidates is None:
        index = index() if callable(index) else index
        candidates = _find(store, index, block_rows)
        if pairs_cache is not None and search_file is not None:  # the search index may
            key = pairs_file.rows_key(store, search_file, candidate_settings())  # be new
    _, evidence = collect_evidence(store, index, paths, block_rows=block_rows,
                                   workers=workers, cache=cache, on_start=on_start,
                                   on_progress=on_progress, candidates=candidates)
    x = pair_features(candidates, evidence) if len(candidates) else None
    scores = pairs_file.scores_key(x, scorer.fingerprint) if x is not None else ""
    if cached is not None and cached.probability is not None and cached.scores_key == scores:
        probability = cached.probability
    else:
        probability = scorer.probability(x) if x is not None else np.zeros(0, np.float32)
        if key is not None:
            pairs_file.save(pairs_cache, pairs_file.CachedPairs(key, candidates, scores,
                                                                probability))
    if len(candidates):  # the same bytes are a copy whatever the pixels show (a blank page)
        digests = np.asarray(store.read("digest"))
        same = (digests[candidates.i] == digests[candidates.j]) & (digests[candidates.i] != "")
        probability = np.where(same, np.float32(1.0), probability).astype(np.float32)
    return ScoredPairs(candidates, evidence, probability)


def _find(store: IndexStore, index, block_rows: int) -> Candidates:
    return find_candidates(index, store.iter_embeddings(block_rows), store.read("phash"),
                           lambda rows: np.asarray(store.read("embeddings", rows)))


def collect_evidence(store: IndexStore, index, paths: list[str], *, block_rows: int = 16384,
                     workers: int | None = None, cache: Path | None = None,
                     on_start: Callable[[int], None] | None = None,
                     on_progress: Callable[[int], None] | None = None,
                     candidates: Candidates | None = None
                     ) -> tuple[Candidates, Sequence[Evidence]]:
    """The candidate pairs of an index (`candidates`, when already known) and the
    verification of each (steps 1 and 2); with
    `cache` (a file, `mgdedup.duplicates.evidence_cache`) pairs of unchanged files verified
    by an earlier run are not verified again, and this run's evidence is kept there.
    `on_start(pairs to verify)` and `on_progress(pairs verified)` follow the work."""
    if candidates is None:
        candidates = _find(store, index() if callable(index) else index, block_rows)
    if cache is None:
        if on_start is not None:
            on_start(len(candidates))
        return candidates, verify_pairs(paths, candidates.i, candidates.j, workers=workers,
                                        on_progress=on_progress)
    from mgdedup.duplicates import evidence_cache

    keys = evidence_cache.pair_keys(store.read("digest"), candidates.i, candidates.j)
    known = evidence_cache.load(cache)
    at = known.positions(keys)
    todo = np.flatnonzero(at < 0)
    log.info("%d of %d candidate pairs verified by an earlier run", len(keys) - len(todo),
             len(keys))
    if on_start is not None:
        on_start(len(todo))
    fresh = EvidenceRows.of(verify_pairs(paths, candidates.i[todo], candidates.j[todo],
                                         workers=workers, on_progress=on_progress))
    if len(todo):  # evidence of bytes other than the indexed ones is not kept under their
        # digests: it would stand for a byte-identical copy of the indexed file next time
        changed = _changed_since_indexing(store, paths, np.concatenate(
            [candidates.i[todo], candidates.j[todo]]))
        if changed.any():
            stale = todo[np.isin(candidates.i[todo], np.flatnonzero(changed))
                         | np.isin(candidates.j[todo], np.flatnonzero(changed))]
            keys = keys.copy()
            keys[stale] = b""
    cached = np.flatnonzero(at >= 0)
    from_cache = known.rows(at[cached])
    values = np.zeros((len(keys), from_cache.values.shape[1]))
    values[cached], values[todo] = from_cache.values, fresh.values
    cells = {int(cached[k]): c for k, c in from_cache.cells.items()}
    cells.update({int(todo[k]): c for k, c in fresh.cells.items()})
    evidence = EvidenceRows(values, cells)
    if len(todo) or len(known) != len(np.unique(at[at >= 0])):  # new pairs, or gone ones
        try:
            evidence_cache.save(cache, keys, evidence)
        except MgdedupError as error:  # a cache that cannot be written costs time only
            log.warning("%s", error)
    return candidates, evidence


def _changed_since_indexing(store: IndexStore, paths: list[str], rows: np.ndarray
                            ) -> np.ndarray:
    """(N,) bool: rows among `rows` whose file's size or modification time is not its row's
    (or that cannot be read)."""
    changed = np.zeros(len(paths), bool)
    sizes, mtimes = store.read("size"), store.read("mtime_ns")
    for row in np.unique(rows).tolist():
        try:
            st = os.stat(paths[row])
        except OSError:
            changed[row] = True
            continue
        changed[row] = st.st_size != int(sizes[row]) or st.st_mtime_ns != int(mtimes[row])
    return changed


def component_groups(n: int, i: np.ndarray, j: np.ndarray, scores: np.ndarray,
                     order: np.ndarray) -> list[Group]:
    """Groups from pairs (i, j, score) above a threshold: connected components, the keeper
    of each the first of its rows in `order`; a member's score is the largest, over paths to
    the keeper, of the smallest score on the path (a maximin path, by a Prim-like search)."""
    if len(i) == 0:
        return []
    neighbours: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for a, b, s in zip(i.tolist(), j.tolist(), scores.tolist()):
        neighbours[a].append((s, b))
        neighbours[b].append((s, a))
    rank = np.empty(n, np.int64)
    rank[np.asarray(order, np.int64)] = np.arange(n)
    seen: set[int] = set()
    groups = []
    for start in sorted(neighbours, key=lambda row: rank[row]):
        if start in seen:
            continue
        members: dict[int, float] = {}
        heap = [(-1.0, start)]  # (-bottleneck, row)
        while heap:
            negative, row = heapq.heappop(heap)
            if row in members:
                continue
            members[row] = -negative
            for score, other in neighbours[row]:
                if other not in members:
                    heapq.heappush(heap, (-min(-negative, score), other))
        seen.update(members)  # start has the smallest rank of its component: the keeper
        ranked = sorted(((row, s) for row, s in members.items() if row != start),
                        key=lambda item: (-item[1], rank[item[0]]))
        groups.append(Group(start, [(int(r), float(s)) for r, s in ranked]))
    groups.sort(key=lambda g: (-len(g.members), -g.best_score))
    return groups

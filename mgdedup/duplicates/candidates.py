"""Pairs worth a closer look: what the global descriptor and the perceptual hash propose.

A copy's original is among its 20 nearest neighbours by descriptor for about 95 % of the
hard copies people make (screenshots, pastes, turns, crops), even where their cosine is far
below any threshold that would keep look-alikes apart; the perceptual hash finds most of the
rest (tiny recompressed thumbnails, pixelated and noised copies), whose descriptors are far
apart. The candidates are the union of both: every row with its `neighbours` nearest rows,
and every pair of rows whose hashes differ in at most `hash_radius` bits. Each candidate comes
with what these signals say of it: the cosine, its rank in either row's neighbour list (the
smaller), the hash distance, and each row's background similarity (the mean similarity to its
neighbours of ranks 3 to 10: how much the image resembles everything).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from mgdedup.duplicates.score_norm import ScoreNorm, background_from_neighbours
from mgdedup.imaging.perceptual_hash import UNKNOWN, hamming

log = logging.getLogger(__name__)

NEIGHBOURS = 20
HASH_RADIUS = 10
#: rank given to a pair found by its hash only
NOT_A_NEIGHBOUR = 99
#: rows above which hash candidates are not searched (all pairs: O(N^2) popcounts)
HASH_SEARCH_ROWS = 250_000
BACKGROUND = ScoreNorm()  # ranks 3-10, as the SSCD-style normalisation


def settings() -> str:
    """The parameters candidates depend on besides the rows (a cache key,
    `mgdedup.duplicates.pair_cache`)."""
    return (f"neighbours={NEIGHBOURS};hash_radius={HASH_RADIUS};"
            f"hash_search_rows={HASH_SEARCH_ROWS};background={BACKGROUND}")


@dataclass
class Candidates:
    """Pairs i < j (int64 arrays) and their global signals."""

    i: np.ndarray
    j: np.ndarray
    cosine: np.ndarray  # float32
    rank: np.ndarray  # int64: 0 = the nearest neighbour of one of them
    hash_distance: np.ndarray  # int64 bits, 64 when a hash is unknown
    background: np.ndarray  # (N,) float32 per row

    def __len__(self) -> int:
        return len(self.i)


def find_candidates(index, blocks: Iterable[tuple[int, np.ndarray]], hashes: np.ndarray,
                    rows_of: Callable[[np.ndarray], np.ndarray],
                    neighbours: int = NEIGHBOURS, hash_radius: int = HASH_RADIUS
                    ) -> Candidates:
    """Candidates of every row: `blocks` are the indexed rows (start, block) as the search
    index holds them, `hashes` their perceptual hashes (uint64, UNKNOWN where missing), and
    `rows_of(sorted rows)` their descriptors (for the cosine of pairs found by hash only)."""
    # FAISS: imported when candidates are made
    from mgdedup.index.faiss_index import is_lossy, knn, rescored_neighbours

    n = len(hashes)
    background = np.zeros(n, np.float32)
    lossy = is_lossy(index)
    found: list[tuple[np.ndarray, ...]] = []  # (i, j, rank, score, query row) per block
    for start, block in blocks:
        scores, ids = knn(index, block, neighbours + 1)
        if lossy:  # 8-bit codes: cosines, ranks and background as the rows say
            scores, ids = rescored_neighbours(block, ids, rows_of)
        rows = np.arange(start, start + len(block), dtype=np.int64)
        valid = (ids != rows[:, None]) & (ids >= 0)
        rank = np.cumsum(valid, axis=1) - 1  # position among the row's other rows
        r, c = np.nonzero(valid & (rank < neighbours))
        kept = np.full((len(block), neighbours), -np.inf, np.float32)
        kept[r, rank[r, c]] = scores[r, c]
        background[start:start + len(block)] = background_from_neighbours(kept, BACKGROUND)
        a, b = rows[r], ids[r, c].astype(np.int64)
        found.append((np.minimum(a, b), np.maximum(a, b), rank[r, c].astype(np.int64),
                      scores[r, c].astype(np.float32), a))
    hash_i, hash_j = _hash_pairs(hashes, hash_radius) if n <= HASH_SEARCH_ROWS else \
        (np.zeros(0, np.int64), np.zeros(0, np.int64))
    found.append((hash_i, hash_j, np.full(len(hash_i), NOT_A_NEIGHBOUR, np.int64),
                  np.full(len(hash_i), np.nan, np.float32), np.full(len(hash_i), n, np.int64)))
    i, j, rank, cosine, seen_from = (np.concatenate(parts) for parts in zip(*found))
    # a pair found several times: its smallest rank, seen first (from the smaller row) on
    # a tie; pairs found by the hash only rank last
    order = np.lexsort((seen_from, rank, j, i))
    i, j, rank, cosine = i[order], j[order], rank[order], cosine[order]
    first = np.ones(len(i), bool)
    first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
    i, j, rank, cosine = i[first], j[first], rank[first], cosine[first]
    missing = np.flatnonzero(np.isnan(cosine))
    if len(missing):
        needed = np.unique(np.concatenate([i[missing], j[missing]]))
        vectors = np.asarray(rows_of(needed), np.float32)
        a = vectors[np.searchsorted(needed, i[missing])]
        b = vectors[np.searchsorted(needed, j[missing])]
        cosine[missing] = np.einsum("ij,ij->i", a, b)
    distance = hamming(hashes[i], hashes[j]) if len(i) else np.zeros(0, np.int64)
    log.info("%d candidate pairs for %d rows (%d found by the hash only)", len(i), n,
             int((rank == NOT_A_NEIGHBOUR).sum()))
    return Candidates(i, j, cosine, rank, distance, background)


def _hash_pairs(hashes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) of known hashes at most `radius` bits apart (FAISS binary range
    search), sorted."""
    import faiss

    empty = np.zeros(0, np.int64), np.zeros(0, np.int64)
    known = np.flatnonzero(hashes != UNKNOWN)
    if len(known) < 2:
        return empty
    codes = np.ascontiguousarray(hashes[known].astype(">u8")).view(np.uint8).reshape(-1, 8)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    lims, _, ids = index.range_search(codes, radius + 1)  # strictly below radius + 1
    query = np.repeat(np.arange(len(known)), np.diff(np.asarray(lims, np.int64)))
    other = np.asarray(ids, np.int64)
    query, other = query[other != query], other[other != query]
    if not len(query):
        return empty
    a, b = known[query], known[other]
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


@dataclass
class QueryCandidates:
    """Indexed rows worth verifying against one query image, and their global signals."""

    rows: np.ndarray  # int64, best cosine first
    cosine: np.ndarray  # float32
    rank: np.ndarray  # int64: position among the query's neighbours (NOT_A_NEIGHBOUR: hash)
    hash_distance: np.ndarray  # int64
    background_query: float
    background_rows: np.ndarray  # float32, per row of `rows`


def query_candidates(index, query: np.ndarray, query_hash: int, hashes: np.ndarray,
                     rows_of: Callable[[np.ndarray], np.ndarray],
                     neighbours: int = NEIGHBOURS, hash_radius: int = HASH_RADIUS
                     ) -> QueryCandidates:
    """The query's `neighbours` nearest rows and the rows whose hash is within `hash_radius`
    bits of its hash, with the signals `find_candidates` gives pairs of indexed rows (each
    row's background from its own neighbours in the index)."""
    from mgdedup.index.faiss_index import knn

    scores, ids = knn(index, query[None, :], neighbours)
    keep = ids[0] >= 0
    near_ids, near_scores = ids[0][keep], scores[0][keep]
    background_query = float(background_from_neighbours(near_scores[None, :], BACKGROUND)[0])
    rank = {int(r): k for k, r in enumerate(near_ids.tolist())}
    by_hash = np.zeros(0, np.int64)
    if query_hash != int(UNKNOWN) and len(hashes) <= HASH_SEARCH_ROWS:
        distance = hamming(hashes, np.uint64(query_hash))
        by_hash = np.flatnonzero(distance <= hash_radius)
    rows = np.array(sorted(set(rank) | set(by_hash.tolist())), np.int64)
    if not len(rows):
        empty = np.zeros(0, np.int64)
        return QueryCandidates(empty, np.zeros(0, np.float32), empty, empty, background_query,
                               np.zeros(0, np.float32))
    vectors = np.asarray(rows_of(rows), np.float32)
    cosine = (vectors @ np.asarray(query, np.float32)).astype(np.float32)
    own_scores, own_ids = knn(index, vectors, neighbours + 1)
    background_rows = np.zeros(len(rows), np.float32)
    for k, row in enumerate(rows.tolist()):
        mine = (own_ids[k] != row) & (own_ids[k] >= 0)
        background_rows[k] = background_from_neighbours(own_scores[k][mine][None, :neighbours],
                                                         BACKGROUND)[0]
    order = np.argsort(-cosine, kind="stable")
    rows, cosine, background_rows = rows[order], cosine[order], background_rows[order]
    return QueryCandidates(
        rows, cosine, np.array([rank.get(int(r), NOT_A_NEIGHBOUR) for r in rows], np.int64),
        hamming(hashes[rows], np.uint64(query_hash)), background_query, background_rows)

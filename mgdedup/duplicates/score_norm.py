"""Similarity normalisation against a background set, after SSCD (Pizzi et al., CVPR 2022).

SSCD ("A Self-Supervised Descriptor for Image Copy Detection") makes one threshold fit every
query by subtracting from each query-reference similarity a multiple of the query's
similarity to its nearest neighbours in a background set of unrelated images: an image that
resembles many others (sky, documents, screenshots of one app) gets a lower score than an
isolated one at the same raw cosine. Precisely, SSCD's normalised score is

    s'(q, r) = s(q, r) - beta * s(q, b_n(q))

with b_n(q) the n-th nearest background image of q. Deduplication has no query side, so the
variant here is the symmetric one of this project's issue 6:

    s'(i, j) = s(i, j) - beta * (bg_i + bg_j) / 2,
    bg_x = mean similarity of x to its background neighbours of ranks skip+1 .. skip+k

with the collection itself as the background (image x itself excluded). The first `skip`
neighbours are left out because in a collection they are often x's own copies, whose
similarity would penalise exactly the pairs we look for; averaging k ranks instead of
taking one is less noisy than SSCD's single n-th neighbour (k=1 gives SSCD's form with
n = skip + 1, times the symmetric average). Normalised scores live on another scale than
cosines (near 0 for typical neighbours), so a threshold must be chosen in the same mode:
`mgdedup calibrate` does, for each mode.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # kept out of imports: the CLI imports this module at start-up
    import faiss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreNorm:
    """Settings of the normalisation (see the module docstring)."""

    skip: int = 2  # nearest neighbours ignored: probably copies of the image itself
    k: int = 8  # neighbours averaged after those
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.skip < 0 or self.k < 1:
            raise ValueError(f"need skip >= 0 and k >= 1, got skip={self.skip}, k={self.k}")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def background_from_neighbours(scores: np.ndarray, norm: ScoreNorm) -> np.ndarray:
    """bg per row from its neighbours' similarities, best first, self already removed.

    Rows with fewer than skip + k neighbours average what there is after the skipped ones
    (and fall back to the last available ranks when even `skip` is not reached), so tiny
    collections still get a finite background.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n, available = scores.shape
    if available == 0:
        return np.zeros(n, np.float32)
    finite = np.isfinite(scores)
    counts = finite.sum(axis=1)
    out = np.zeros(n, np.float64)
    full = counts >= norm.skip + norm.k  # the usual case, at once
    if full.any():
        out[full] = scores[full, norm.skip:norm.skip + norm.k].mean(axis=1)
    for row in np.flatnonzero(~full).tolist():
        have = int(counts[row])
        if have == 0:
            continue
        lo = min(norm.skip, max(have - norm.k, 0))
        hi = min(lo + norm.k, have)
        out[row] = scores[row, lo:hi].mean()
    return out.astype(np.float32)


def drop_self(scores: np.ndarray, ids: np.ndarray, rows: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its neighbour list (or the last column when ties
    pushed it out of the list), keeping order."""
    if rows is None:
        return scores, ids
    is_self = ids == rows[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    # several equal rows (exact duplicates) can tie with self: drop only the first match
    first = is_self & (np.cumsum(is_self, axis=1) == 1)
    keep = ~first
    width = ids.shape[1] - 1
    return scores[keep].reshape(-1, width), ids[keep].reshape(-1, width)


def background_scores(index: faiss.Index, queries: np.ndarray, norm: ScoreNorm,
                      rows: np.ndarray | None = None) -> np.ndarray:
    """bg of each query vector against the indexed collection.

    `rows`: the index rows of the queries when they are indexed themselves (their own entry
    is then excluded); None for outside images (synthetic copies in calibration), which are
    treated as if they had been added to the collection.
    """
    from mgdedup.index.faiss_index import knn

    extra = 1 if rows is not None else 0
    scores, ids = knn(index, queries, norm.skip + norm.k + extra)
    if extra and scores.shape[1]:
        scores, ids = drop_self(scores, ids, np.asarray(rows, dtype=np.int64))
    return background_from_neighbours(scores, norm)


def collection_background(index: faiss.Index, blocks: Iterable[tuple[int, np.ndarray]],
                          norm: ScoreNorm) -> np.ndarray:
    """bg of every indexed row, from (start, block) pairs such as store.iter_embeddings()."""
    parts = []
    for start, block in blocks:
        rows = np.arange(start, start + len(block), dtype=np.int64)
        parts.append(background_scores(index, block, norm, rows))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def normalise(scores: np.ndarray, bg_i: np.ndarray, bg_j: np.ndarray, norm: ScoreNorm
              ) -> np.ndarray:
    """s'(i, j) = s(i, j) - beta * (bg_i + bg_j) / 2, elementwise, float32."""
    return (np.asarray(scores, np.float32)
            - np.float32(norm.beta) * (np.asarray(bg_i, np.float32)
                                       + np.asarray(bg_j, np.float32)) / np.float32(2)
            ).astype(np.float32)


def default_score_norm(calibrated: bool) -> ScoreNorm | None:
    """The scoring `dedup` uses without --score-norm/--no-score-norm.

    Normalised whenever the threshold is calibrated on this collection (`--precision`): it
    raises micro-AP on IN-aug at s* 224 and 500 and on edited real photos (BENCHMARKS.md,
    "Score normalisation"), and calibration puts the threshold on its scale. Cosine when the
    threshold IS a cosine (`--threshold`, or the one measured for the model and stored in
    the index), so those numbers keep their meaning.
    """
    return ScoreNorm() if calibrated else None

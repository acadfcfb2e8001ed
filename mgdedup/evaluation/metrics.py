"""Evaluation metrics of the MultiGrain paper's protocols (section 4.1), vectorised in numpy.

Conventions shared by every function here:

* Higher similarity / score / logit = better match.
* Ties are broken deterministically and *stably by position*: among equal scores, the item
  with the lower row (column, list, class) index is ranked first. This is what
  ``np.argsort(-s, kind="stable")`` does, and the rank-counting shortcuts below reproduce it:
  the 0-based rank of item j in a row s is ``#{i: s_i > s_j} + #{i < j: s_i == s_j}``.
* Average precision (AP) is the standard non-interpolated one. With a ranked list of
  relevance flags r_1..r_M and R relevant items in total (some possibly never retrieved),

      AP = (1 / R) * sum_{k: r_k} precision@k,   precision@k = (r_1 + ... + r_k) / k

  so a relevant item that is not in the list contributes precision 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Rows of a similarity matrix ranked at once: bounds memory to CHUNK x N int64 indices.
CHUNK = 256


def average_precision(ranked_relevant: np.ndarray, n_relevant: int, *,
                      trapezoid: bool = False) -> float:
    """AP of one ranked list of relevance flags (best first), with `n_relevant` positives.

    `n_relevant` may exceed the number of True flags (positives never retrieved count as
    precision 0); it may not be smaller, nor 0.

    trapezoid=True gives instead the variant of the INRIA Holidays evaluation script
    (``score_ap_from_ranks_1``), which averages, at each hit (k-th hit, 1-based, at 1-based
    rank n), the precision just before and just after it: ((k-1)/(n-1) + k/n) / 2, with
    (k-1)/(n-1) taken as 1 when n = 1. It is slightly above the plain AP; published Holidays
    numbers use it.
    """
    hits = np.asarray(ranked_relevant, dtype=bool).ravel()
    return float(_ap_rows(hits[None, :], np.array([n_relevant]), trapezoid)[0])


def _ap_rows(hits: np.ndarray, n_relevant: np.ndarray, trapezoid: bool = False) -> np.ndarray:
    """AP of each row of a (Q x M) boolean matrix of ranked relevance flags."""
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    found = hits.sum(axis=1)
    if (n_relevant <= 0).any():
        raise ValueError("average precision is undefined without relevant items "
                         f"({int((n_relevant <= 0).sum())} list(s) have none)")
    if (found > n_relevant).any():
        raise ValueError("more relevant items retrieved than n_relevant")
    true_positives = np.cumsum(hits, axis=1)
    rank = np.arange(1, hits.shape[1] + 1)
    precision = true_positives / rank
    if trapezoid:
        before = np.where(rank > 1, (true_positives - 1) / np.maximum(rank - 1, 1), 1.0)
        precision = (precision + before) / 2
    return (precision * hits).sum(axis=1) / n_relevant


def _ranked_chunks(similarity: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, column order best first, ties by column index) for chunks of rows."""
    for start in range(0, len(similarity), CHUNK):
        rows = slice(start, start + CHUNK)
        yield rows, np.argsort(-similarity[rows], axis=1, kind="stable")


def _rank_of(similarity: np.ndarray, column: np.ndarray) -> np.ndarray:
    """0-based rank of column[i] in row i of similarity (stable tie-breaking), no sort."""
    target = similarity[np.arange(len(similarity)), column][:, None]
    before = np.arange(similarity.shape[1])[None, :] < column[:, None]
    return ((similarity > target) | ((similarity == target) & before)).sum(axis=1)


def _check_2d(name: str, a: np.ndarray, columns: int | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    if columns is not None and a.shape[1] != columns:
        raise ValueError(f"{name} has {a.shape[1]} columns, expected {columns}")
    return a


def holidays_map(similarity: np.ndarray, query_rows: np.ndarray, group_of_row: np.ndarray, *,
                 trapezoid: bool = False) -> float:
    """INRIA Holidays mean average precision.

    similarity: (Q x N), row q = query q against all N database images, the queries included
    (query q *is* database image query_rows[q]). group_of_row: (N,) group id of each image.
    For each query, all database images except the query itself are ranked; relevant = same
    group; n_relevant = group size - 1. Returns the mean of the Q APs (see module docstring;
    trapezoid=True for the official script's variant). A query alone in its group raises
    ValueError (its AP is undefined).
    """
    group_of_row = np.asarray(group_of_row).ravel()
    query_rows = np.asarray(query_rows, dtype=np.int64).ravel()
    similarity = _check_2d("similarity", similarity, len(group_of_row))
    if len(query_rows) != len(similarity):
        raise ValueError(f"{len(query_rows)} query rows for {len(similarity)} similarity rows")
    _, inverse, sizes = np.unique(group_of_row, return_inverse=True, return_counts=True)
    aps = []
    for rows, order in _ranked_chunks(similarity):
        queries = query_rows[rows]
        keep = order != queries[:, None]  # exactly one False per row: the query itself
        order = order[keep].reshape(len(order), -1)
        hits = group_of_row[order] == group_of_row[queries][:, None]
        aps.append(_ap_rows(hits, sizes[inverse[queries]] - 1, trapezoid))
    return float(np.concatenate(aps).mean()) if aps else 0.0


def ukb_score(similarity: np.ndarray, group_of_row: np.ndarray) -> float:
    """UKBench N-S score: mean number of same-group images among the top 4, query included.

    similarity: (N x N), every image queried against all N (itself included, *not* excluded:
    it normally ranks first). group_of_row: (N,) group id (groups of 4). Range 0-4; 4.0 =
    perfect. Ties are broken by column index.
    """
    group_of_row = np.asarray(group_of_row).ravel()
    similarity = _check_2d("similarity", similarity, len(group_of_row))
    if len(similarity) != len(group_of_row):
        raise ValueError("UKB similarity must be square (every image is a query)")
    counts = []
    for rows, order in _ranked_chunks(similarity):
        top = order[:, :4]
        counts.append((group_of_row[top] == group_of_row[rows][:, None]).sum(axis=1))
    return float(np.concatenate(counts).mean()) if counts else 0.0


def copydays_map(similarity: np.ndarray, positive_of_query: np.ndarray) -> float:
    """Copydays mAP with exactly one positive per query: mean of 1 / (1-based rank of it).

    similarity: (Q x N) queries (the edits, not in the database) against the database
    (originals + distractors); positive_of_query: (Q,) column of each query's original.
    """
    positive_of_query = np.asarray(positive_of_query, dtype=np.int64).ravel()
    similarity = _check_2d("similarity", similarity)
    if len(positive_of_query) != len(similarity):
        raise ValueError(f"{len(positive_of_query)} positives for {len(similarity)} queries")
    if len(similarity) == 0:
        return 0.0
    return float((1.0 / (_rank_of(similarity, positive_of_query) + 1)).mean())


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits (ties: lower class first)."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    logits = _check_2d("logits", logits)
    if len(labels) != len(logits):
        raise ValueError(f"{len(labels)} labels for {len(logits)} rows of logits")
    if k < 1:
        raise ValueError("k must be >= 1")
    if len(logits) == 0:
        return 0.0
    return float((_rank_of(logits, labels) < k).mean())


def _scored_pairs(scores: np.ndarray, is_positive: np.ndarray, n_positives: int | None
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Flat float64 scores, flat bool labels of the same length, and the positive count
    (`n_positives`, default the labelled ones)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_positive = np.asarray(is_positive, dtype=bool).ravel()
    if len(scores) != len(is_positive):
        raise ValueError(f"{len(scores)} scores for {len(is_positive)} labels")
    return scores, is_positive, int(is_positive.sum()) if n_positives is None else int(n_positives)


def micro_ap(scores: np.ndarray, is_positive: np.ndarray, n_positives: int | None = None
             ) -> float:
    """Micro average precision over a global list of (query, result) pairs (DISC2021 style).

    All pairs of all queries are ranked together by score (ties: list order) and scored as
    one list: AP = (1 / n_positives) * sum over positive pairs of precision at their rank.
    n_positives = number of ground-truth positive pairs, default the positives in the list;
    pass the true count so that positives the system never returned count as precision 0.
    """
    scores, is_positive, total = _scored_pairs(scores, is_positive, n_positives)
    order = np.argsort(-scores, kind="stable")
    return float(_ap_rows(is_positive[order][None, :], np.array([total]))[0])


def precision_recall_at(scores: np.ndarray, is_positive: np.ndarray, threshold: float,
                        n_positives: int | None = None) -> tuple[float, float]:
    """(precision, recall) of flagging every pair with score >= threshold.

    precision = TP / flagged (1.0 when nothing is flagged: no false alarm);
    recall = TP / n_positives (default: the positives in the list; 0.0 when there are none).
    """
    scores, is_positive, total = _scored_pairs(scores, is_positive, n_positives)
    flagged = scores >= threshold
    true_positives = int((flagged & is_positive).sum())
    if true_positives > total:
        raise ValueError("more positives flagged than n_positives")
    precision = true_positives / flagged.sum() if flagged.any() else 1.0
    recall = true_positives / total if total else 0.0
    return float(precision), float(recall)


def threshold_at_precision(scores: np.ndarray, is_positive: np.ndarray, target: float,
                           n_positives: int | None = None) -> tuple[float | None, float]:
    """(threshold, recall there): the lowest score at which the pairs ranked so far (by score,
    ties in list order) are still at least `target` precise, taken at a positive pair; (None,
    0.0) when no positive reaches it. Recall counts `n_positives` (default: the list's)."""
    scores, is_positive, total = _scored_pairs(scores, is_positive, n_positives)
    order = np.argsort(-scores, kind="stable")
    hits = is_positive[order]
    true_positives = np.cumsum(hits)
    precision = true_positives / np.arange(1, len(hits) + 1)
    reached = np.flatnonzero((precision >= target) & hits)
    if not len(reached) or total == 0:
        return None, 0.0
    last = int(reached[-1])
    return float(scores[order][last]), float(true_positives[last] / total)


@dataclass
class PairMetrics:
    """Pair-level copy detection over every pair of a set of descriptors."""

    micro_ap: float  # average precision of all pairs ranked by score
    threshold: float | None  # lowest score with precision >= target (None: never reached)
    recall_at_threshold: float
    target_precision: float


def pair_metrics(x: np.ndarray, family: np.ndarray, target_precision: float = 0.99
                 ) -> PairMetrics:
    """Micro-AP and the target-precision threshold over all pairs of the rows of x (positive:
    same `family`). O(n^2) pairs: for calibration sets of a few thousand images."""
    family = np.asarray(family)
    upper = np.triu_indices(len(x), k=1)
    scores = (x @ x.T)[upper]
    positive = family[upper[0]] == family[upper[1]]
    if not positive.any():
        return PairMetrics(0.0, None, 0.0, target_precision)
    threshold, recall = threshold_at_precision(scores, positive, target_precision)
    return PairMetrics(micro_ap(scores, positive), threshold, recall, target_precision)

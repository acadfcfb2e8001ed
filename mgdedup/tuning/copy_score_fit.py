"""Fitting the copy score (`mgdedup.duplicates.copy_score`) on labelled candidate pairs.

Gradient boosting of depth-limited regression trees on the logistic loss (Friedman 2001,
second-order leaf values as in XGBoost), with each feature cut at bins (`_bin_edges`): a few hundred
trees fit ~20,000 pairs in seconds and give probabilities that are close to calibrated.
The precision curve stored with the model is measured on out-of-fold predictions (each pair
scored by a model that did not see its family), so it is not the fitting set's own optimism,
and, given the rows and families of the pairs, on the groups `dedup` would make from them.
"""

from __future__ import annotations

import numpy as np

from mgdedup.duplicates.copy_score import FEATURES, CopyScorer, Tree
from mgdedup.evaluation.metrics import threshold_at_precision

TREES = 300
DEPTH = 3
RATE = 0.1
BINS = 32
MIN_LEAF = 20
L2 = 1.0


def _bin_edges(x: np.ndarray, bins: int) -> list[np.ndarray]:
    """Split points per feature ("x < edge" goes left): every distinct value but the smallest
    where there are at most `bins` of them, else quantiles of the distinct values plus both
    sides of every value that holds more than 1/bins of the samples. So a feature whose
    samples are nearly all one value (a measurement most pairs lack) keeps that value in a
    bin of its own, and can still be split where it varies."""
    edges = []
    for f in range(x.shape[1]):
        values, counts = np.unique(x[:, f], return_counts=True)
        if len(values) <= bins:
            edges.append(values[1:])
            continue
        heavy = np.flatnonzero(counts > len(x) / bins)
        around = np.concatenate([heavy[heavy > 0], heavy[heavy + 1 < len(values)] + 1])
        edges.append(np.unique(np.concatenate([
            np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]), values[around]])))
    return edges


class _Grower:
    def __init__(self, binned: np.ndarray, edges: list[np.ndarray], depth: int, min_leaf: int,
                 l2: float) -> None:
        self.binned, self.edges = binned, edges
        self.depth, self.min_leaf, self.l2 = depth, min_leaf, l2

    def grow(self, g: np.ndarray, h: np.ndarray) -> Tree:
        nodes: list[list[float]] = []  # [feature, threshold, left, right, value]

        def split(rows: np.ndarray, level: int) -> int:
            number = len(nodes)
            total_g, total_h = g[rows].sum(), h[rows].sum()
            nodes.append([-1, 0.0, -1, -1, -total_g / (total_h + self.l2)])
            best = self._best_split(rows, g, h, total_g, total_h) \
                if level < self.depth and len(rows) >= 2 * self.min_leaf else None
            if best is None:
                return number
            feature, cut = best
            below = self.binned[rows, feature] <= cut
            nodes[number][0], nodes[number][1] = feature, float(self.edges[feature][cut])
            nodes[number][2] = split(rows[below], level + 1)
            nodes[number][3] = split(rows[~below], level + 1)
            return number

        split(np.arange(len(g)), 0)
        table = np.array(nodes, np.float64)
        return Tree(table[:, 0].astype(np.int64), table[:, 1], table[:, 2].astype(np.int64),
                    table[:, 3].astype(np.int64), table[:, 4])

    def _best_split(self, rows: np.ndarray, g: np.ndarray, h: np.ndarray, total_g: float,
                    total_h: float) -> tuple[int, int] | None:
        best, best_gain = None, 1e-9
        parent = total_g ** 2 / (total_h + self.l2)
        for feature, edges in enumerate(self.edges):
            if not len(edges):
                continue
            count = len(edges) + 1
            bins = self.binned[rows, feature]
            gs = np.bincount(bins, weights=g[rows], minlength=count)[:-1].cumsum()
            hs = np.bincount(bins, weights=h[rows], minlength=count)[:-1].cumsum()
            ns = np.bincount(bins, minlength=count)[:-1].cumsum()
            ok = (ns >= self.min_leaf) & (len(rows) - ns >= self.min_leaf)
            if not ok.any():
                continue
            gain = gs ** 2 / (hs + self.l2) + (total_g - gs) ** 2 / (total_h - hs + self.l2) \
                - parent
            gain[~ok] = -np.inf
            cut = int(np.argmax(gain))
            if gain[cut] > best_gain:
                best, best_gain = (feature, cut), float(gain[cut])
        return best


def fit_trees(x: np.ndarray, y: np.ndarray, trees: int = TREES, depth: int = DEPTH,
              rate: float = RATE, bins: int = BINS, min_leaf: int = MIN_LEAF, l2: float = L2
              ) -> tuple[list[Tree], float]:
    """(trees, base margin) of a boosted model of P(y = 1 | x)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    edges = _bin_edges(x, bins)
    binned = np.column_stack([np.searchsorted(e, x[:, f], side="right")
                              for f, e in enumerate(edges)])
    prior = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
    base = float(np.log(prior / (1 - prior)))
    margin = np.full(len(y), base)
    grower = _Grower(binned, edges, depth, min_leaf, l2)
    forest = []
    for _ in range(trees):
        p = 1.0 / (1.0 + np.exp(-margin))
        tree = grower.grow(p - y, p * (1 - p))
        forest.append(tree)
        margin += rate * tree.predict(x)
    return forest, base


def fit_copy_scorer(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, folds: int = 3,
                    target_precision: float = 0.99, fitted_on: str = "", seed: int = 0,
                    pairs: tuple[np.ndarray, np.ndarray] | None = None,
                    row_family: np.ndarray | None = None,
                    keeper_order: np.ndarray | None = None) -> CopyScorer:
    """The scorer of labelled pairs `x` (FEATURES columns), `y` (1: a copy), `groups` (the
    family of each pair: folds never split one). Its curve and default threshold (the lowest
    score reaching `target_precision`, at least 0.5) come from out-of-fold scores.

    With `pairs` (the rows (i, j) of each pair), `row_family` (the family of every row) and
    `keeper_order`, the curve is that of the DECISIONS `dedup` makes from those scores
    (`decision_curve`: groups, not pairs), which is what a threshold promises a user: one
    wrong pair can join two families, and every member of one then pairs wrongly with the
    other's keeper."""
    if x.shape[1] != len(FEATURES):
        raise ValueError(f"{x.shape[1]} columns, expected {len(FEATURES)}")
    families = np.unique(groups)
    fold_of = dict(zip(families.tolist(), np.random.default_rng(seed).integers(0, folds,
                                                                              len(families))))
    fold = np.array([fold_of[g] for g in groups.tolist()])
    out_of_fold = np.zeros(len(y))
    for k in range(folds):
        train = fold != k
        trees, base = fit_trees(x[train], y[train])
        out_of_fold[~train] = CopyScorer(trees, base, RATE).probability(x[~train])
    trees, base = fit_trees(x, y)
    if pairs is not None and row_family is not None:
        curve = decision_curve(out_of_fold, pairs[0], pairs[1], row_family, keeper_order)
        reached = [t for t, precision, recall in curve
                   if precision >= target_precision and recall > 0]
        threshold = min(reached) if reached else None
    else:
        curve = _curve(out_of_fold, y.astype(bool))
        threshold, _ = threshold_at_precision(out_of_fold, y.astype(bool), target_precision)
    default = max(0.5, float(threshold)) if threshold is not None else 0.5
    return CopyScorer(trees, base, RATE, default_threshold=round(default, 4), curve=curve,
                      fitted_on=fitted_on)


def decision_curve(scores: np.ndarray, i: np.ndarray, j: np.ndarray, row_family: np.ndarray,
                   keeper_order: np.ndarray | None = None, points: int = 101
                   ) -> list[tuple[float, float, float]]:
    """(threshold, precision, recall) of the groups made at evenly spaced thresholds, as
    `dedup` makes them (`component_groups`): precision over keeper-member pairs (a pair is
    right when both rows share a family), recall over the rows of families of two or more
    (a row is found when its group holds another row of its family)."""
    from mgdedup.duplicates.copy_search import component_groups

    n = len(row_family)
    order = np.arange(n) if keeper_order is None else np.asarray(keeper_order)
    sizes = np.bincount(np.unique(row_family, return_inverse=True)[1])
    family_index = np.unique(row_family, return_inverse=True)[1]
    findable = int((sizes[family_index] >= 2).sum())
    out = []
    for t in np.linspace(0.0, 1.0, points):
        keep = scores >= t
        groups = component_groups(n, i[keep], j[keep], scores[keep].astype(np.float32), order)
        right = wrong = found = 0
        for group in groups:
            rows = [group.keeper, *(m for m, _ in group.members)]
            for member, _ in group.members:
                if row_family[member] == row_family[group.keeper]:
                    right += 1
                else:
                    wrong += 1
            counts: dict[object, int] = {}
            for row in rows:
                counts[row_family[row]] = counts.get(row_family[row], 0) + 1
            found += sum(c for c in counts.values() if c >= 2)
        precision = right / (right + wrong) if right + wrong else 1.0
        out.append((round(float(t), 4), round(precision, 6),
                    round(found / max(1, findable), 6)))
    return out


def _curve(scores: np.ndarray, positive: np.ndarray, points: int = 101
           ) -> list[tuple[float, float, float]]:
    """(threshold, precision, recall) of the pairs at evenly spaced score thresholds."""
    out = []
    for t in np.linspace(0.0, 1.0, points):
        flagged = scores >= t
        true = int((flagged & positive).sum())
        precision = true / max(1, int(flagged.sum())) if flagged.any() else 1.0
        out.append((round(float(t), 4), round(precision, 6),
                    round(true / max(1, int(positive.sum())), 6)))
    return out

"""The copy score: the probability that a pair is a copy, from every signal at hand.

`dedup` compares this number, in [0, 1], with `--threshold`: 0.9 keeps the pairs it is at
least 90 % sure of. It comes from a small boosted-tree model (depth-3 trees on logistic loss)
over the pair's features (`FEATURES`): the descriptor's cosine, the cosine less the two
images' background similarity, the neighbour rank, the perceptual-hash distance, and the
local-feature evidence of `mgdedup.duplicates.local_match`. The model is fitted on copies of
photos of every kind people make, against look-alike photos and other copies
(`mgdedup.tuning.copy_score_fit`); it belongs to one model, whitening and resolution, and
travels with them (the default model's in `mgdedup/assets`).

File format (JSON, "mgdedup-copy-score" version 1): `features` (names, in order), `base`,
`rate`, `trees` (per tree the node arrays `feature`, `threshold`, `left`, `right`, `value`; a
node with feature -1 is a leaf; a sample goes left when its feature is below the threshold),
`default_threshold`, `curve` ([score threshold, precision, recall] measured on the fitting
copies) and `fitted_on` (what it was fitted on, in words).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mgdedup.duplicates.candidates import Candidates
from mgdedup.duplicates.local_match import Evidence, EvidenceRows
from mgdedup.errors import MgdedupError
from mgdedup.files.atomic import write_text

FORMAT = "mgdedup-copy-score"
VERSION = 1
FEATURES = ("cosine", "normalised", "log_rank", "hash_bits", "log_inliers", "cover_min",
            "cover_max", "angle", "log_scale", "mirrored", "agree_fraction", "disagree",
            "inlier_ratio", "frame_disagree")


def pair_features(candidates: Candidates, evidence: Sequence[Evidence]) -> np.ndarray:
    """(P, len(FEATURES)) float64: the model's input for each candidate pair."""
    from mgdedup.duplicates.frames import frame_agreement

    c = candidates
    return features(c.cosine, c.background[c.i], c.background[c.j], c.rank, c.hash_distance,
                    evidence, frame_agreement(c.i, c.j, evidence))


def features(cosine: np.ndarray, background_a: np.ndarray, background_b: np.ndarray,
             rank: np.ndarray, hash_distance: np.ndarray, evidence: Sequence[Evidence],
             frame_agree: np.ndarray | None = None) -> np.ndarray:
    """The FEATURES columns of pairs (a, b) from their signals, one array entry per pair:
    the cosine, each image's background similarity, the neighbour rank, the hash distance,
    the local evidence and the frame agreement (`mgdedup.duplicates.frames`; not measured
    where None: a pair seen without the rest of its collection).

    The frame agreement enters as evidence against only ("frame_disagree": the share of
    own-content cells where the pair differs, 0 where not measured): a pair that agrees
    where its frame-mates differ looks like any unframed pair. Fitting copies rarely have a
    third image in their frame, so a raw agreement would be learned as "framed, so a shared
    template" and turn down true copies in collections where they do."""
    local = EvidenceRows.of(evidence).values
    inliers, cover_a, cover_b, angle, log_scale, mirrored, agree, disagree, ratio = local.T
    cosine = np.asarray(cosine, np.float32)  # float32 arithmetic, as the fitting data had
    normalised = cosine - (np.asarray(background_a, np.float32)
                           + np.asarray(background_b, np.float32)) / 2
    return np.column_stack([
        cosine.astype(np.float64), normalised.astype(np.float64),
        np.log1p(np.asarray(rank, np.float64)),
        np.asarray(hash_distance, np.float64), np.log1p(inliers),
        np.minimum(cover_a, cover_b), np.maximum(cover_a, cover_b), angle, log_scale, mirrored,
        agree / (agree + disagree + 1), disagree, ratio,
        _frame_disagree(frame_agree, len(cosine))])


def _frame_disagree(frame_agree: np.ndarray | None, pairs: int) -> np.ndarray:
    from mgdedup.duplicates.frames import NOT_MEASURED

    if frame_agree is None:
        return np.zeros(pairs)
    agree = np.asarray(frame_agree, np.float64)
    return np.where(agree == NOT_MEASURED, 0.0, 1.0 - agree)


@dataclass
class Tree:
    feature: np.ndarray  # int, -1 at leaves
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    value: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        node = np.zeros(len(x), np.int64)
        for _ in range(len(self.feature)):  # at most one step per level
            inner = self.feature[node] >= 0
            if not inner.any():
                break
            at = node[inner]
            below = x[np.flatnonzero(inner), self.feature[at]] < self.threshold[at]
            node[inner] = np.where(below, self.left[at], self.right[at])
        return self.value[node]


class _PerfectForest:
    """The trees as complete trees of one depth, nodes in heap order (children of k at 2k+1
    and 2k+2), so that a tree is evaluated with one comparison per level over whole feature
    columns instead of a walk per sample: about 15x faster on the ~10^5 candidate pairs of
    a 10,000-image collection. A leaf above the full depth becomes a split that sends every
    sample to two copies of itself, so the sums equal :meth:`Tree.predict`'s."""

    #: deeper trees would make the complete form too large; they are walked instead
    MAX_DEPTH = 6

    def __init__(self, feature: np.ndarray, threshold: np.ndarray, value: np.ndarray) -> None:
        self.feature, self.threshold, self.value = feature, threshold, value
        self.depth = int(np.log2(value.shape[1]))

    @classmethod
    def of(cls, trees: list[Tree]) -> _PerfectForest | None:
        if not trees:
            return None
        depths = [_depth(t) for t in trees]
        depth = max(depths)
        if depth > cls.MAX_DEPTH:
            return None
        inner, leaves = 2 ** depth - 1, 2 ** depth
        feature = np.zeros((len(trees), max(inner, 1)), np.int64)
        threshold = np.full((len(trees), max(inner, 1)), np.inf)
        value = np.zeros((len(trees), leaves))
        for t, tree in enumerate(trees):
            stack = [(0, 0, 0)]  # (node of the tree, heap position, level)
            while stack:
                node, at, level = stack.pop()
                if level == depth:
                    value[t, at - inner] = tree.value[node]
                elif tree.feature[node] < 0:  # a leaf above the full depth: both ways
                    stack += [(node, 2 * at + 1, level + 1), (node, 2 * at + 2, level + 1)]
                else:
                    feature[t, at] = tree.feature[node]
                    threshold[t, at] = tree.threshold[node]
                    stack += [(int(tree.left[node]), 2 * at + 1, level + 1),
                              (int(tree.right[node]), 2 * at + 2, level + 1)]
        return cls(feature, threshold, value)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The sum of the trees' values for each row of x (as Tree.predict: a sample goes
        right unless its feature is below the threshold, so NaN goes right)."""
        columns = np.ascontiguousarray(np.asarray(x, np.float64).T)
        n = len(x)
        total = np.zeros(n)
        if self.depth == 0:
            return total + self.value[:, 0].sum()
        offsets = np.arange(n)
        for feature, threshold, value in zip(self.feature, self.threshold, self.value):
            # every node's decision at once: (nodes, n), flattened for one gather per level
            right = (~(columns[feature] < threshold[:, None])).ravel()
            at = np.zeros(n, np.intp)  # heap position of each sample's node
            for _ in range(self.depth):
                at = 2 * at + 1 + right[at * n + offsets]
            total += value[at - (2 ** self.depth - 1)]
        return total


def _depth(tree: Tree, node: int = 0) -> int:
    if tree.feature[node] < 0:
        return 0
    return 1 + max(_depth(tree, int(tree.left[node])), _depth(tree, int(tree.right[node])))


@dataclass
class CopyScorer:
    """The fitted model (see the module docstring)."""

    trees: list[Tree]
    base: float
    rate: float
    default_threshold: float = 0.5
    curve: list[tuple[float, float, float]] = field(default_factory=list)
    features: tuple[str, ...] = FEATURES
    fitted_on: str = ""

    def __post_init__(self) -> None:
        self._forest = _PerfectForest.of(self.trees)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """A hash of everything the scores depend on (a cache key)."""
        if self._fingerprint is None:
            digest = hashlib.sha1(repr((FORMAT, VERSION, self.features, self.base,
                                        self.rate)).encode())
            for tree in self.trees:
                for array in (tree.feature, tree.threshold, tree.left, tree.right, tree.value):
                    digest.update(np.ascontiguousarray(array).tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def probability(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1] != len(self.features):
            raise ValueError(f"{x.shape[1]} features for a model of {len(self.features)}")
        if self._forest is not None:
            total = self._forest.predict(x)
        else:
            total = sum((t.predict(x) for t in self.trees), np.zeros(len(x)))
        margin = self.base + self.rate * total
        return (1.0 / (1.0 + np.exp(-margin))).astype(np.float32)

    def threshold_for(self, precision: float) -> tuple[float, float, float] | None:
        """(score threshold, precision, recall) of the lowest threshold that reached
        `precision` on the fitting copies."""
        reached = [point for point in self.curve if point[1] >= precision and point[2] > 0]
        return min(reached, key=lambda point: point[0]) if reached else None

    # --- the file -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "features": list(self.features),
                "base": self.base, "rate": self.rate,
                "default_threshold": self.default_threshold, "curve": self.curve,
                "fitted_on": self.fitted_on,
                "trees": [{"feature": t.feature.tolist(), "threshold": t.threshold.tolist(),
                           "left": t.left.tolist(), "right": t.right.tolist(),
                           "value": t.value.tolist()} for t in self.trees]}

    @classmethod
    def from_dict(cls, data: object, origin: str = "copy score") -> CopyScorer:
        """A scorer from its stored form, every field checked (an untrusted file)."""
        try:
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError("not a copy score model")
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, this mgdedup reads {VERSION}")
            features = tuple(str(f) for f in data["features"])
            if features != FEATURES:
                raise ValueError(f"features {list(features)} are not {list(FEATURES)}")
            trees = [_tree(t, len(features)) for t in data["trees"]]
            numbers = [float(data["base"]), float(data["rate"]),
                       float(data["default_threshold"])]
            if not all(math.isfinite(v) for v in numbers) or not 0 <= numbers[2] <= 1:
                raise ValueError("base, rate or default_threshold out of range")
            curve = [tuple(float(v) for v in point) for point in data.get("curve", [])]
            if any(len(point) != 3 or not all(math.isfinite(v) for v in point)
                   for point in curve):
                raise ValueError("a curve point is not three finite numbers")
        except (KeyError, TypeError, ValueError) as error:
            raise MgdedupError(f"{origin} is malformed: {error}") from None
        return cls(trees, numbers[0], numbers[1], numbers[2], curve,  # type: ignore[arg-type]
                   features, str(data.get("fitted_on", "")))

    def save(self, path: Path) -> None:
        write_text(path, json.dumps(self.to_dict()) + "\n", "copy score model")

    @classmethod
    def load(cls, path: Path) -> CopyScorer:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise MgdedupError(f"cannot read copy score model {path}: {error}") from None
        return cls.from_dict(data, str(path))


def _tree(data: dict, features: int) -> Tree:
    arrays = {name: np.asarray(data[name]) for name in
              ("feature", "threshold", "left", "right", "value")}
    n = len(arrays["feature"])
    if n == 0 or any(len(a) != n for a in arrays.values()):
        raise ValueError("tree arrays of different lengths")
    feature = arrays["feature"].astype(np.int64)
    left, right = arrays["left"].astype(np.int64), arrays["right"].astype(np.int64)
    inner = feature >= 0
    if (feature >= features).any() or ((left[inner] <= np.flatnonzero(inner)) |
                                       (right[inner] <= np.flatnonzero(inner))).any() \
            or (left[inner] >= n).any() or (right[inner] >= n).any():
        raise ValueError("a tree's nodes do not form a tree")  # children come after parents
    values = arrays["value"].astype(np.float64)
    thresholds = arrays["threshold"].astype(np.float64)
    if not (np.isfinite(values).all() and np.isfinite(thresholds[inner]).all()):
        raise ValueError("a tree holds values that are not finite numbers")
    return Tree(feature, thresholds, left, right, values)

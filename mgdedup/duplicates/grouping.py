"""Duplicate groups as stars around a keeper: no chaining through intermediate images.

Similar-pairs graphs chain (A~B, B~C, yet A and C unrelated), so connected components mix
unrelated images. Here images are visited from the most to the least worth keeping; an image
not yet in a group becomes a keeper and takes every still-free neighbour whose similarity TO
IT reaches the threshold. Each member is therefore a direct match of its keeper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Group:
    keeper: int
    members: list[tuple[int, float]] = field(default_factory=list)  # (row, similarity to keeper)
    cosines: dict[int, float] = field(default_factory=dict)  # row -> raw cosine to the keeper
    keeper_reason: str = ""  # why this file is the keeper, in words (`keepers.KeeperRule`)

    @property
    def best_score(self) -> float:
        return max((score for _, score in self.members), default=0.0)


def keeper_order(pixels: np.ndarray, sizes: np.ndarray, paths: list[str]) -> np.ndarray:
    """Rows from most to least worth keeping: most pixels, then largest file, then the
    shortest path, then the path itself, so the choice is deterministic and explainable."""
    path_lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
    by_name = np.argsort(np.array(paths, dtype=object), kind="stable")
    name_rank = np.empty(len(paths), dtype=np.int64)
    name_rank[by_name] = np.arange(len(paths))
    # np.lexsort sorts by the LAST key first; negate what should be descending
    return np.lexsort((name_rank, path_lengths, -np.asarray(sizes, dtype=np.int64),
                       -np.asarray(pixels, dtype=np.int64)))


def star_groups(n: int, i: np.ndarray, j: np.ndarray, scores: np.ndarray,
                order: np.ndarray) -> list[Group]:
    """Groups from pairs (i, j, score) above a threshold, keepers visited in `order`.

    Memory is O(n + pairs): the pairs become a CSR neighbour list.
    """
    if len(i) == 0:
        return []
    src = np.concatenate([i, j]).astype(np.int64)
    dst = np.concatenate([j, i]).astype(np.int64)
    sim = np.concatenate([scores, scores]).astype(np.float32)
    sort = np.argsort(src, kind="stable")
    src, dst, sim = src[sort], dst[sort], sim[sort]
    starts = np.searchsorted(src, np.arange(n + 1))
    assigned = np.zeros(n, dtype=bool)
    groups: list[Group] = []
    order = np.asarray(order, dtype=np.int64)
    # only rows with a pair can keep anything: at 1M rows and 10k pairs this skips 98 % of
    # the Python loop (0.9 s -> 0.02 s)
    order = order[starts[order + 1] > starts[order]]
    for keeper in order.tolist():
        if assigned[keeper]:
            continue
        lo, hi = starts[keeper], starts[keeper + 1]
        if lo == hi:
            continue
        neighbours, neighbour_scores = dst[lo:hi], sim[lo:hi]
        free = ~assigned[neighbours]
        if not free.any():
            continue
        members = neighbours[free]
        member_scores = neighbour_scores[free]
        assigned[keeper] = True
        assigned[members] = True
        ranking = np.argsort(-member_scores, kind="stable")
        groups.append(Group(int(keeper), [(int(members[r]), float(member_scores[r]))
                                          for r in ranking]))
    groups.sort(key=lambda g: (-len(g.members), -g.best_score))
    return groups

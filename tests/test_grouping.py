"""Star groups: every member matches its keeper directly; keepers chosen by a stated rule."""

import numpy as np

from mgdedup.duplicates.grouping import keeper_order, star_groups


def _pairs(sim, threshold):
    i, j = np.nonzero(np.triu(sim >= threshold, k=1))
    return i, j, sim[i, j].astype(np.float32)


def test_no_chaining_through_an_intermediate_image():
    # A~B and B~C above threshold, A and C not: C must not join A's group.
    sim = np.array([[1, .95, .5], [.95, 1, .95], [.5, .95, 1]], dtype=np.float32)
    order = np.array([0, 1, 2])
    groups = star_groups(3, *_pairs(sim, 0.9), order)
    assert len(groups) == 1 and groups[0].keeper == 0
    assert [row for row, _ in groups[0].members] == [1]


def test_random_graph_every_member_matches_its_keeper_and_appears_once():
    rng = np.random.default_rng(0)
    n = 300
    x = rng.normal(size=(n, 8))
    x[100:200] = x[:100] + 0.2 * rng.normal(size=(100, 8))  # planted copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    threshold = 0.9
    order = rng.permutation(n)
    groups = star_groups(n, *_pairs(sim, threshold), order)
    seen = []
    for group in groups:
        seen.append(group.keeper)
        for row, score in group.members:
            assert sim[group.keeper, row] >= threshold - 1e-6
            assert abs(sim[group.keeper, row] - score) < 1e-5
            seen.append(row)
    assert len(seen) == len(set(seen))
    # an image left out has no free neighbour: each of its matches is a MEMBER of a group
    # (a keeper would have taken it, since it was free when the keeper was visited)
    keepers = {group.keeper for group in groups}
    members = {row for group in groups for row, _ in group.members}
    for lonely in set(range(n)) - set(seen):
        matches = set((sim[lonely] >= threshold).nonzero()[0]) - {lonely}
        assert matches <= members and not matches & keepers
    assert len(groups) >= 80  # most planted pairs are found


def test_keeper_rule_pixels_then_bytes_then_shorter_path():
    pixels = np.array([100, 400, 400, 400])
    sizes = np.array([10, 5, 9, 9])
    paths = ["a/zz.jpg", "b/long/name.jpg", "c/x.jpg", "c/y/x.jpg"]
    assert list(keeper_order(pixels, sizes, paths)) == [2, 3, 1, 0]
    assert list(keeper_order(np.ones(2), np.ones(2), ["b.jpg", "a.jpg"])) == [1, 0]

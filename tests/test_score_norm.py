"""SSCD-style score normalisation against a brute-force numpy reference on random vectors."""

from __future__ import annotations

import numpy as np
import pytest

from mgdedup.duplicates.find import find_duplicates
from mgdedup.duplicates.grouping import keeper_order, star_groups
from mgdedup.duplicates.score_norm import (
    ScoreNorm,
    background_scores,
    collection_background,
    normalise,
)
from mgdedup.index.faiss_index import build_index
from mgdedup.index.layout import IndexDir
from mgdedup.index.store import IndexMeta, IndexStore, RowBatch

DIM = 24


def _vectors(n: int, seed: int) -> np.ndarray:
    """Unit vectors in a few loose clusters (so backgrounds differ), with planted near-copies
    and one exact duplicate (ties with the row itself)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, DIM))
    x = centres[rng.integers(0, 4, n)] * rng.uniform(0, 1.5, (n, 1)) + rng.standard_normal((n, DIM))
    x[1] = x[0] + 0.05 * rng.standard_normal(DIM)
    x[3] = x[2] + 0.2 * rng.standard_normal(DIM)
    x[5] = x[4]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _reference_background(x: np.ndarray, norm: ScoreNorm) -> np.ndarray:
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    ranked = -np.sort(-sim, axis=1)
    return ranked[:, norm.skip:norm.skip + norm.k].mean(axis=1)


@pytest.mark.parametrize("norm", [ScoreNorm(), ScoreNorm(0, 1, 1.0), ScoreNorm(3, 5, 0.5)])
def test_background_matches_brute_force(norm):
    x = _vectors(70, seed=1)
    index = build_index(x, DIM)
    got = collection_background(index, [(0, x[:30]), (30, x[30:])], norm)
    np.testing.assert_allclose(got, _reference_background(x, norm), atol=1e-5)


def test_outside_queries_see_every_row():
    x = _vectors(50, seed=2)
    queries = _vectors(7, seed=3)
    norm = ScoreNorm(1, 4, 1.0)
    got = background_scores(build_index(x, DIM), queries, norm)
    sim = queries.astype(np.float64) @ x.T
    expected = (-np.sort(-sim, axis=1))[:, 1:5].mean(axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pair_scores_are_shifted_by_the_mean_background():
    norm = ScoreNorm(beta=0.75)
    scores = np.array([0.9, 0.5], np.float32)
    out = normalise(scores, np.array([0.2, 0.4]), np.array([0.3, 0.0]), norm)
    np.testing.assert_allclose(out, [0.9 - 0.75 * 0.25, 0.5 - 0.75 * 0.2], atol=1e-6)


def _index_of_vectors(folder, x: np.ndarray):
    meta = IndexMeta(model_id="test", model_name="test", resolution=64, p=3.0,
                     whitening_id="", dim=DIM, roots=[str(folder)])
    n = len(x)
    rows = np.arange(n)
    batch = RowBatch(paths=[f"img{r:03d}.jpg" for r in rows], root=np.zeros(n, np.int32),
                     size=1000 + rows, mtime_ns=rows + 1, digest=[f"{r:032x}" for r in rows],
                     width=100 + rows % 7, height=80 + rows % 5, embeddings=x,
                     gem_norm=np.ones(n), white_norm=np.ones(n))
    with IndexStore.create(IndexDir(folder).embeddings, meta) as store:
        store.append(batch)
    return folder


@pytest.mark.parametrize("threshold", [0.05, 0.2])
def test_dedup_with_normalisation_equals_brute_force(tmp_path, threshold):
    x = _vectors(80, seed=4)
    index_dir = _index_of_vectors(tmp_path, x)
    norm = ScoreNorm()
    result = find_duplicates(index_dir, threshold, score_norm=norm)
    assert result.score_norm == norm

    bg = _reference_background(x, norm)
    sim = x.astype(np.float64) @ x.T
    i, j = np.triu_indices(len(x), k=1)
    scores = sim[i, j] - norm.beta * (bg[i] + bg[j]) / 2
    keep = scores >= threshold
    assert keep.sum() > 0
    facts = result.facts
    order = keeper_order(pixels=[f.width * f.height for f in facts],
                         sizes=[f.size for f in facts], paths=[f.path for f in facts])
    expected = star_groups(len(x), i[keep], j[keep], scores[keep].astype(np.float32), order)
    assert [(g.keeper, [m for m, _ in g.members]) for g in result.groups] == \
        [(g.keeper, [m for m, _ in g.members]) for g in expected]
    for got, want in zip(result.groups, expected):
        np.testing.assert_allclose([s for _, s in got.members], [s for _, s in want.members],
                                   atol=1e-4)
    # the same index without normalisation groups by raw cosine
    raw = find_duplicates(index_dir, threshold)
    assert raw.score_norm is None
    flagged = sim[i, j] >= threshold
    expected_raw = star_groups(len(x), i[flagged], j[flagged],
                               sim[i, j][flagged].astype(np.float32), order)
    assert [(g.keeper, [m for m, _ in g.members]) for g in raw.groups] == \
        [(g.keeper, [m for m, _ in g.members]) for g in expected_raw]

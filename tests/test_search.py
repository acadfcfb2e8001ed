"""FAISS search over stored descriptors, checked against NumPy brute force."""

from __future__ import annotations

import os
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from mgdedup.errors import MgdedupError
from mgdedup.index.faiss_index import (
    build_index,
    ensure_index,
    is_stale,
    knn,
    load_index,
    range_pairs,
    save_index,
)
from mgdedup.index.layout import IndexDir
from mgdedup.index.store import IndexMeta, IndexStore, RowBatch

THRESHOLD = 0.9


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(n: int = 3000, d: int = 64, n_dups: int = 300, seed: int = 0) -> np.ndarray:
    """Random unit vectors whose last rows are noisy copies of earlier ones (some sources
    copied twice), with similarities spread on both sides of THRESHOLD."""
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, d)))
    src = rng.choice(n - n_dups, n_dups)
    sigma = rng.uniform(0.05, 0.7, n_dups)[:, None]
    x[n - n_dups:] = unit(x[src] + sigma * unit(rng.standard_normal((n_dups, d))))
    return x


def brute_pairs(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = x @ x.T
    i, j = np.triu_indices(len(x), 1)
    keep = s[i, j] >= threshold
    return i[keep], j[keep], s[i, j][keep]


def blocks_of(x: np.ndarray, size: int) -> list[tuple[int, np.ndarray]]:
    return [(s, x[s:s + size]) for s in range(0, len(x), size)]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return planted()


@pytest.fixture(scope="module")
def flat(data: np.ndarray) -> faiss.Index:
    return build_index(data, data.shape[1])


# --- knn -------------------------------------------------------------------------------------
def test_knn_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    x, q = unit(rng.standard_normal((500, 32))), unit(rng.standard_normal((20, 32)))
    index = build_index(x, 32)
    scores, ids = knn(index, q, 10)
    s = q @ x.T
    expected = np.argsort(-s, axis=1)[:, :10]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(s, expected, 1), atol=1e-5)
    assert scores.dtype == np.float32 and ids.dtype == np.int64

    scores, ids = knn(index, q, 10_000)  # k > n: clamped
    assert ids.shape == (20, 500)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(500), (20, 1)))
    _, one_ids = knn(index, q[0], 3)  # a single 1-D query
    np.testing.assert_array_equal(one_ids, expected[:1, :3])


def test_knn_on_empty_index_and_missing_neighbours() -> None:
    scores, ids = knn(build_index(np.zeros((0, 8), np.float32), 8), np.ones((2, 8)), 5)
    assert scores.shape == ids.shape == (2, 0)
    rng = np.random.default_rng(2)
    x = unit(rng.standard_normal((2000, 16)))
    index = build_index(x, 16, "IVF32,Flat")
    faiss.extract_index_ivf(index).nprobe = 1  # one list: fewer than k results
    scores, ids = knn(index, x[:5], 2000)
    assert (ids == -1).any()
    assert np.all(np.isneginf(scores[ids == -1]))
    assert np.all(np.isfinite(scores[ids >= 0]))


# --- range_pairs -----------------------------------------------------------------------------
@pytest.mark.parametrize("block", [1, 50, 500, 2999, 4096])
def test_range_pairs_match_brute_force(data: np.ndarray, flat: faiss.Index, block: int) -> None:
    i, j, s = range_pairs(flat, blocks_of(data, block), THRESHOLD)
    bi, bj, bs = brute_pairs(data, THRESHOLD)
    assert len(bi) > 100  # planted pairs above the threshold exist ...
    assert (data @ data.T)[np.triu_indices(len(data), 1)].max() > THRESHOLD  # sanity
    np.testing.assert_array_equal(i, bi)  # brute force is sorted by (i, j) too
    np.testing.assert_array_equal(j, bj)
    np.testing.assert_allclose(s, bs, atol=1e-5)
    assert i.dtype == j.dtype == np.int64 and s.dtype == np.float32
    assert np.all(i < j)


def test_range_pairs_split_large_blocks(data: np.ndarray, flat: faiss.Index,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mgdedup.index.faiss_index.QUERY_ROWS", 128)  # blocks searched in pieces
    for index in (flat, build_index(data, data.shape[1], "IVF64,Flat")):
        i, j, _ = range_pairs(index, blocks_of(data, 1000), THRESHOLD)
        expected = range_pairs(index, blocks_of(data, 128), THRESHOLD)
        np.testing.assert_array_equal(i, expected[0])
        np.testing.assert_array_equal(j, expected[1])
    bi, bj, _ = brute_pairs(data, THRESHOLD)
    i, j, _ = range_pairs(flat, blocks_of(data, 3000), THRESHOLD)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_array_equal(j, bj)


def test_range_pairs_include_a_score_equal_to_the_threshold() -> None:
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((64, 16)))
    x[10] = 0
    x[10, 0] = 1
    x[40] = 0
    x[40, :2] = [0.6, 0.8]  # <x10, x40> is float32(0.6) exactly, whatever the summation order
    t = np.float32(0.6)
    index = build_index(x, 16)
    for block in (1, 64):  # FAISS's SIMD path (few queries) and its BLAS path
        i, j, s = range_pairs(index, blocks_of(x, block), float(t))
        assert (10, 40) in set(zip(i.tolist(), j.tolist()))
        assert s[(i == 10) & (j == 40)][0] == t
        i, j, _ = range_pairs(index, blocks_of(x, block), float(np.nextafter(t, np.inf)))
        assert (10, 40) not in set(zip(i.tolist(), j.tolist()))
    i, j, _ = range_pairs(index, blocks_of(x, 64), 0.6)  # a float64 0.6 means float32(0.6)
    assert (10, 40) in set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW32"])
def test_approximate_index_recall(data: np.ndarray, factory: str) -> None:
    index = build_index(data, data.shape[1], factory)
    i, j, s = range_pairs(index, blocks_of(data, 1000), THRESHOLD)
    exact = set(zip(*brute_pairs(data, THRESHOLD)[:2]))
    found = set(zip(i.tolist(), j.tolist()))
    assert len(found & exact) / len(exact) >= 0.9
    assert np.all(i < j) and np.all(s >= np.float32(THRESHOLD))
    assert len(found) == len(i)  # a pair found from both ends is reported once


def test_range_pairs_max_pairs(data: np.ndarray, flat: faiss.Index) -> None:
    with pytest.raises(MgdedupError, match="threshold is too low"):
        range_pairs(flat, blocks_of(data, 500), -1.0, max_pairs=10_000)


def test_range_pairs_empty(flat: faiss.Index) -> None:
    i, j, s = range_pairs(flat, [], THRESHOLD)
    assert len(i) == len(j) == len(s) == 0


# --- building, saving, loading ---------------------------------------------------------------
def test_build_from_block_stream_with_training(data: np.ndarray) -> None:
    index = build_index(iter(blocks_of(data, 700)), data.shape[1], "IVF16,Flat", train_rows=1000)
    assert index.ntotal == len(data)
    _, ids = knn(index, data[:50], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(50))
    with pytest.raises(ValueError, match="contiguous"):
        build_index([(5, data[:10])], data.shape[1])


def test_bad_factory_and_too_few_rows(data: np.ndarray) -> None:
    with pytest.raises(MgdedupError, match="invalid FAISS factory"):
        build_index(data, data.shape[1], "NoSuchIndex99")
    with pytest.raises(MgdedupError, match="IVF4096"):
        build_index(data[:100], data.shape[1], "IVF4096,Flat")


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_save_load_round_trip(tmp_path: Path, data: np.ndarray, factory: str) -> None:
    index = build_index(data, data.shape[1], factory)
    path = tmp_path / IndexDir.FAISS
    save_index(index, path)
    save_index(index, path)  # replacing an existing one
    assert os.listdir(tmp_path) == [IndexDir.FAISS]  # no temporary left behind
    loaded = load_index(path)
    assert loaded.ntotal == index.ntotal
    a, b = knn(index, data[:30], 5), knn(loaded, data[:30], 5)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    if factory != "Flat":
        assert faiss.extract_index_ivf(loaded).nprobe == 16  # search defaults are saved


def test_load_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(MgdedupError, match="not found"):
        load_index(tmp_path / "none.index")
    (tmp_path / "bad.index").write_bytes(b"garbage" * 10)
    with pytest.raises(MgdedupError, match="corrupt"):
        load_index(tmp_path / "bad.index")


# --- staleness -------------------------------------------------------------------------------
def make_rows(x: np.ndarray, offset: int) -> RowBatch:
    n = len(x)
    ones = np.ones(n, np.int64)
    return RowBatch(paths=[f"img{offset + k}.jpg" for k in range(n)], root=0 * ones,
                    size=ones, mtime_ns=ones, digest=["0" * 32] * n, width=ones, height=ones,
                    embeddings=x, gem_norm=np.ones(n), white_norm=np.ones(n))


def bump_mtime(path: Path) -> None:
    """Filesystems with coarse timestamps: make 'written later' unambiguous."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_ensure_index_rebuilds_when_rows_change(tmp_path: Path, data: np.ndarray) -> None:
    idx_dir = tmp_path / "idx"
    h5 = idx_dir / "embeddings.h5"
    meta = IndexMeta("m", "m", 500, 3.0, "", data.shape[1], ["/photos"])
    store = IndexStore.create(h5, meta)
    store.append(make_rows(data[:1000], 0))
    faiss_path = idx_dir / IndexDir.FAISS
    assert is_stale(faiss_path, h5)

    index = ensure_index(idx_dir, store)
    assert index.ntotal == 1000 and faiss_path.is_file()
    assert not is_stale(faiss_path, h5)
    built = faiss_path.stat().st_mtime_ns
    time.sleep(0.01)
    assert ensure_index(idx_dir, store).ntotal == 1000
    assert faiss_path.stat().st_mtime_ns == built  # fresh: loaded, not rebuilt

    store.append(make_rows(data[1000:1500], 1000))
    bump_mtime(h5)
    assert is_stale(faiss_path, h5)
    index = ensure_index(idx_dir, store)
    assert index.ntotal == 1500
    _, ids = knn(index, data[1200:1201], 1)
    assert ids[0, 0] == 1200

    store.remove_rows(np.arange(0, 1500, 3))
    bump_mtime(h5)
    index = ensure_index(idx_dir, store)
    assert index.ntotal == 1000
    np.testing.assert_array_equal(faiss.rev_swig_ptr(index.get_xb(), 1000 * 64).reshape(-1, 64),
                                  store.embeddings())


def test_ensure_index_keeps_or_changes_the_factory(tmp_path: Path, data: np.ndarray) -> None:
    h5 = tmp_path / "embeddings.h5"
    store = IndexStore.create(h5, IndexMeta("m", "m", 500, 3.0, "", 64, ["/p"]))
    store.append(make_rows(data[:2000], 0))
    assert isinstance(ensure_index(tmp_path, store, "IVF16,Flat"), faiss.IndexIVFFlat)
    store.append(make_rows(data[2000:], 2000))
    bump_mtime(h5)
    index = ensure_index(tmp_path, store)  # stale, rebuilt as the same kind
    assert isinstance(index, faiss.IndexIVFFlat) and index.ntotal == len(data)
    assert isinstance(ensure_index(tmp_path, store, "Flat"), faiss.IndexFlat)
    (tmp_path / IndexDir.FAISS).write_bytes(b"truncated")  # a damaged cache is simply rebuilt
    bump_mtime(tmp_path / IndexDir.FAISS)
    assert ensure_index(tmp_path, store).ntotal == len(data)

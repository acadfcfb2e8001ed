"""FAISS factory choice: automatic by row count, `index --factory` remembered, and approximate
(IVF) dedup finding the pairs an exact brute-force search finds."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from cli_helpers import run
from conftest import copy_tree, photo

from mgdedup.duplicates.find import find_duplicates
from mgdedup.index import faiss_index
from mgdedup.index.faiss_index import (
    AUTO_IVF_ROWS,
    AUTO_SQ_BYTES,
    auto_factory,
    build_and_save,
    build_index,
    ensure_index,
    is_lossy,
    load_index,
    range_pairs,
    resolve_factory,
)
from mgdedup.index.store import IndexMeta, IndexStore, RowBatch


def planted_vectors(n: int = 6000, dim: int = 64, copies: int = 300, seed: int = 3
                    ) -> np.ndarray:
    """Random unit rows; `copies` of them replaced by near-copies (cosine 0.85-0.99)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    picked = rng.choice(n, 2 * copies, replace=False)
    src, dst = picked[:copies], picked[copies:]
    noise = rng.standard_normal((copies, dim)).astype(np.float32) * rng.uniform(
        0.02, 0.07, (copies, 1)).astype(np.float32)
    x[dst] = x[src] + noise
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    return x


def brute_force_pairs(x: np.ndarray, t: float) -> set[tuple[int, int]]:
    i, j = np.nonzero(np.triu(x @ x.T >= np.float32(t), 1))
    return set(zip(i.tolist(), j.tolist()))


def rows(x: np.ndarray) -> RowBatch:
    n = len(x)
    ones = np.ones(n, np.int64)
    return RowBatch(paths=[f"img{k}.jpg" for k in range(n)], root=0 * ones, size=ones,
                    mtime_ns=ones, digest=["0" * 32] * n, width=ones, height=ones,
                    embeddings=x, gem_norm=np.ones(n), white_norm=np.ones(n))


def test_auto_factory_is_exact_up_to_the_cut_over_then_ivf() -> None:
    assert auto_factory(0) == auto_factory(AUTO_IVF_ROWS) == "Flat"
    assert auto_factory(1_000_000) == "IVF1024,Flat"
    for n in (AUTO_IVF_ROWS + 1, 3_000_000, 50_000_000):
        nlist = int(auto_factory(n)[3:].split(",")[0])
        assert nlist & (nlist - 1) == 0 and np.sqrt(n) / 2 <= nlist <= 2 * np.sqrt(n)
    for dim in (256, 1280):  # float vectors up to AUTO_SQ_BYTES, 8-bit codes above
        last_flat = AUTO_SQ_BYTES // (4 * dim)
        assert auto_factory(last_flat, dim).endswith(",Flat")
        assert auto_factory(last_flat + 1, dim).endswith(",SQ8")
    assert auto_factory(1_000_000, 1280) == "IVF1024,SQ8"  # 4.8 GiB of floats
    assert auto_factory(100_000_000) == "IVF8192,SQ8"  # 2^round(log2(1e4))
    assert resolve_factory(None, 10**7, 1280) == "IVF4096,SQ8"
    assert resolve_factory(None, 10) == resolve_factory("auto", 10) == "Flat"
    assert resolve_factory(" HNSW32 ", 10) == "HNSW32"


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF32,Flat"])
def test_ivf_range_pairs_equal_brute_force_on_planted_copies(factory: str) -> None:
    x = planted_vectors()
    expected = brute_force_pairs(x, 0.8)
    assert len(expected) >= 300  # every planted copy, and nothing else at this threshold
    exact = range_pairs(build_index(x, x.shape[1], "Flat"), [(0, x)], 0.8)
    index = build_index(x, x.shape[1], factory)
    assert isinstance(index, faiss.IndexIVFFlat) and index.nprobe < index.nlist
    i, j, s = range_pairs(index, [(0, x[:2500]), (2500, x[2500:])], 0.8)
    assert set(zip(i.tolist(), j.tolist())) == expected
    assert set(zip(exact[0].tolist(), exact[1].tolist())) == expected
    np.testing.assert_allclose(s, np.einsum("ij,ij->i", x[i], x[j]), atol=1e-5)


def test_ivf_self_join_returns_what_faiss_range_search_returns(monkeypatch) -> None:
    """The list-by-list matrix products are only a faster way to FAISS's own IVF search."""
    x = planted_vectors(n=4000, copies=200, seed=5)
    index = build_index(x, x.shape[1], "IVF64,Flat")
    index.nprobe = 4  # few probes: some pairs are missed, and both must miss the same ones
    ours = range_pairs(index, [(0, x)], 0.5)
    monkeypatch.setattr(faiss_index._IvfLists, "of", classmethod(lambda cls, index: None))
    theirs = range_pairs(index, [(0, x)], 0.5)
    assert set(zip(ours[0].tolist(), ours[1].tolist())) == \
        set(zip(theirs[0].tolist(), theirs[1].tolist()))
    assert len(ours[0]) > 0


def test_dedup_with_a_stored_ivf_factory_finds_the_flat_groups(tmp_path: Path) -> None:
    x = planted_vectors()
    groups = {}
    for name, factory in (("flat", None), ("ivf", "IVF64,Flat")):
        idx = tmp_path / name
        meta = IndexMeta("m", "m", 224, 3.0, "", x.shape[1], ["/p"], factory=factory)
        with IndexStore.create(idx / "embeddings.h5", meta) as store:
            store.append(rows(x))
        result = find_duplicates(idx, 0.8)
        kind = type(load_index(idx / "faiss.index"))
        assert kind is (faiss.IndexFlatIP if factory is None else faiss.IndexIVFFlat)
        groups[name] = sorted((g.keeper, sorted(m for m, _ in g.members))
                              for g in result.groups)
    assert groups["flat"] == groups["ivf"] and len(groups["flat"]) >= 290


def test_ensure_index_uses_the_stored_factory(tmp_path: Path) -> None:
    x = planted_vectors(n=3000, copies=10)
    meta = IndexMeta("m", "m", 224, 3.0, "", x.shape[1], ["/p"])
    with IndexStore.create(tmp_path / "embeddings.h5", meta) as store:
        store.append(rows(x))
        assert isinstance(ensure_index(tmp_path, store), faiss.IndexFlat)  # auto: small
        store.set_options(factory="IVF16,Flat")
        assert store.meta.factory == "IVF16,Flat"
        assert isinstance(ensure_index(tmp_path, store), faiss.IndexIVFFlat)
    with IndexStore.open(tmp_path / "embeddings.h5") as store:
        assert store.meta.factory == "IVF16,Flat"


def test_factory_persists_across_reindex(planted, tmp_path: Path) -> None:
    folder = copy_tree(planted.folder, tmp_path / "photos")
    idx = tmp_path / "idx"
    result = run("index", folder, "-r", "64", "--workers", "0", "--out", idx,
                 "--factory", "IVF4,Flat")
    assert result.exit_code == 0, result.output
    assert isinstance(load_index(idx / "faiss.index"), faiss.IndexIVFFlat)
    # a new file, no --factory: the index keeps the remembered one
    photo(80, 60, seed=9).save(folder / "extra.png")
    result = run("index", folder, "-r", "64", "--workers", "0", "--out", idx)
    assert result.exit_code == 0, result.output
    with IndexStore.open(idx / "embeddings.h5") as store:
        assert store.meta.factory == "IVF4,Flat"
        n = len(store)
    index = load_index(idx / "faiss.index")
    assert isinstance(index, faiss.IndexIVFFlat) and index.ntotal == n
    # back to automatic: small, so exact; nothing embedded, still rebuilt
    result = run("index", folder, "-r", "64", "--workers", "0", "--out", idx,
                 "--factory", "auto")
    assert result.exit_code == 0 and "0 indexed" in result.output, result.output
    assert isinstance(load_index(idx / "faiss.index"), faiss.IndexFlat)
    with IndexStore.open(idx / "embeddings.h5") as store:
        assert store.meta.factory is None
    result = run("index", folder, "-r", "64", "--workers", "0", "--out", idx,
                 "--factory", "IVF,Nope")
    assert result.exit_code == 1 and "invalid FAISS factory" in result.output
    assert "Traceback" not in result.output


def test_lossy_factories_are_told_apart_from_exact_ones() -> None:
    x = planted_vectors(n=2000, copies=10)
    assert not is_lossy(build_index(x, 64)) and not is_lossy(build_index(x, 64, "IVF8,Flat"))
    assert not is_lossy(build_index(x, 64, "HNSW16"))
    assert is_lossy(build_index(x, 64, "IVF8,SQ8")) and is_lossy(build_index(x, 64, "IVF8,PQ8"))


def test_sq8_pairs_rescored_from_the_rows_equal_brute_force() -> None:
    """Codes move a cosine by up to ~0.005 at 64-d: the lossy search goes LOSSY_MARGIN below
    the threshold, so no pair at or above it is lost; re-scoring drops the extra ones."""
    x = planted_vectors(n=6000, copies=300, seed=8)
    for t in (0.8, 0.9, 0.95):
        expected = brute_force_pairs(x, t)
        index = build_index(x, 64, "IVF16,SQ8")
        index.nprobe = 16  # every list: only the codes' error is tested here
        i, j, s = range_pairs(index, [(0, x)], t)
        assert s.min() >= t - faiss_index.LOSSY_MARGIN
        exact = np.einsum("ij,ij->i", x[i], x[j])
        assert np.abs(exact - s).max() < 0.01
        kept = exact >= np.float32(t)
        assert set(zip(i[kept].tolist(), j[kept].tolist())) == expected
        assert len(expected) > 50


def test_lists_built_on_disk_search_like_lists_in_memory(tmp_path: Path, monkeypatch,
                                                        capfd) -> None:
    x = planted_vectors(n=5000, copies=250, seed=9)
    monkeypatch.setattr(faiss_index, "DISK_PART_ROWS", 1800)  # three part indexes merged
    monkeypatch.setattr(faiss_index, "LIST_RAM_FRACTION", 0.0)  # "RAM runs out" at any size
    meta = IndexMeta("m", "m", 224, 3.0, "", 64, ["/p"], factory="IVF16,SQ8")
    with IndexStore.create(tmp_path / "embeddings.h5", meta) as store:
        store.append(rows(x))
        first = build_and_save(store, "IVF16,SQ8", tmp_path / "faiss.index")
        lists = sorted(tmp_path.glob("faiss-*.ivfdata"))
        assert len(lists) == 1
        on_disk = load_index(tmp_path / "faiss.index")
        inverted = faiss.extract_index_ivf(on_disk).invlists
        assert isinstance(faiss.downcast_InvertedLists(inverted), faiss.OnDiskInvertedLists)
        in_memory = build_index(x, 64, "IVF16,SQ8")
        assert on_disk.ntotal == in_memory.ntotal == len(x)
        for index in (on_disk, in_memory):
            index.nprobe = 4
        a, b = range_pairs(on_disk, [(0, x)], 0.8), range_pairs(in_memory, [(0, x)], 0.8)
        for got, want in zip(a, b):
            np.testing.assert_array_equal(got, want)
        assert len(a[0]) > 200
        scores, ids = faiss_index.knn(on_disk, x[:50], 3)
        assert (ids[:, 0] == np.arange(50)).all()  # ids are row numbers
        del first, on_disk
        build_and_save(store, "IVF16,SQ8", tmp_path / "faiss.index")  # a rebuild
        again = sorted(tmp_path.glob("faiss-*.ivfdata"))
        assert len(again) == 1 and again != lists  # the old list file is gone
    assert capfd.readouterr().out == ""  # FAISS's own messages never reach stdout (data)


def test_dedup_on_a_lossy_index_finds_the_flat_groups_at_exact_scores(tmp_path: Path) -> None:
    x = planted_vectors()
    found = {}
    for name, factory in (("flat", None), ("sq8", "IVF8,SQ8")):
        idx = tmp_path / name
        meta = IndexMeta("m", "m", 224, 3.0, "", x.shape[1], ["/p"], factory=factory)
        with IndexStore.create(idx / "embeddings.h5", meta) as store:
            store.append(rows(x))
        result = find_duplicates(idx, 0.8)
        assert is_lossy(load_index(idx / "faiss.index")) == (factory is not None)
        found[name] = sorted((g.keeper, sorted((m, round(float(s), 5)) for m, s in g.members))
                             for g in result.groups)
    assert found["flat"] == found["sq8"] and len(found["flat"]) >= 290


def test_neighbours_of_a_lossy_index_are_rescored_from_the_rows() -> None:
    x = planted_vectors(n=3000, copies=100, seed=11)
    index = build_index(x, 64, "IVF8,SQ8")
    index.nprobe = 8
    queries = x[:40]
    approx, ids = faiss_index.knn(index, queries, 5)
    ids[3, 4] = -1  # a slot FAISS left empty stays last
    scores, order_ids = faiss_index.rescored_neighbours(queries, ids, lambda rows: x[rows])
    for q in range(len(queries)):
        kept = order_ids[q][order_ids[q] >= 0]
        assert sorted(kept.tolist()) == sorted(ids[q][ids[q] >= 0].tolist())
        np.testing.assert_allclose(scores[q][:len(kept)], x[kept] @ queries[q], atol=1e-6)
        assert (np.diff(scores[q][:len(kept)]) <= 0).all()
    assert order_ids[3, 4] == -1 and scores[3, 4] == -np.inf
    exact_at_faiss_order = np.einsum("qd,qkd->qk", queries, x[np.maximum(ids, 0)])
    assert np.abs(approx - exact_at_faiss_order)[ids >= 0].max() > 1e-4  # FAISS's are not


def test_a_cosine_threshold_on_product_quantized_codes_is_refused() -> None:
    """PQ scores move by far more than LOSSY_MARGIN: a threshold on them would silently miss
    most pairs, so range search says so instead (the copy path's neighbours still work)."""
    from mgdedup.errors import MgdedupError

    x = planted_vectors(n=3000, copies=50, seed=12)
    index = build_index(x, 64, "IVF8,PQ8")
    with pytest.raises(MgdedupError, match="product-quantized"):
        range_pairs(index, [(0, x)], 0.8)
    assert len(faiss_index.knn(index, x[:5], 3)[1]) == 5

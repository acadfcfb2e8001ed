"""The HDF5 index rows: round trips, appends, compaction, refusals, concurrent readers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mgdedup.errors import MgdedupError
from mgdedup.index.store import IndexMeta, IndexStore, RowBatch

DIM = 16


def make_meta(roots: list[str] | None = None) -> IndexMeta:
    return IndexMeta(model_id="abc123", model_name="efficientnet-lite0", resolution=500,
                     p=3.0, whitening_id="", dim=DIM, roots=roots or ["/photos", "/more"])


def make_batch(n: int, offset: int = 0, seed: int = 0) -> RowBatch:
    rng = np.random.default_rng(seed + offset)
    emb = rng.standard_normal((n, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rows = np.arange(offset, offset + n)
    return RowBatch(
        paths=[f"été/日本/img {r}.jpg" for r in rows],
        root=rows % 2,
        size=rows * 1000 + 2**33,  # beyond int32
        mtime_ns=rows + 1_700_000_000_000_000_000,
        digest=[f"{r:032x}" for r in rows],
        width=rows + 100,
        height=rows + 200,
        embeddings=emb,
        gem_norm=rows.astype(np.float32) + 0.5,
        white_norm=np.full(n, 1.0, np.float32),
    )


def assert_rows_equal(store: IndexStore, expected: RowBatch) -> None:
    assert len(store) == len(expected)
    assert list(store.read("paths")) == expected.paths
    assert list(store.read("digest")) == expected.digest
    for name in ("root", "size", "mtime_ns", "width", "height", "gem_norm", "white_norm"):
        got = store.read(name)
        np.testing.assert_array_equal(got, getattr(expected, name))
        assert got.dtype == getattr(expected, name).dtype
    np.testing.assert_array_equal(store.embeddings(), expected.embeddings)


def concat(batches: list[RowBatch]) -> RowBatch:
    return RowBatch(**{
        name: ([v for b in batches for v in getattr(b, name)] if name in ("paths", "digest")
               else np.concatenate([getattr(b, name) for b in batches]))
        for name in RowBatch.__dataclass_fields__})


@pytest.fixture
def h5(tmp_path: Path) -> Path:
    return tmp_path / "idx" / "embeddings.h5"


def test_round_trip_every_column(h5: Path) -> None:
    batch = make_batch(50)
    with IndexStore.create(h5, make_meta()) as store:
        store.append(batch)
    with IndexStore.open(h5) as store:
        assert store.meta == make_meta()
        assert_rows_equal(store, batch)
        assert store.embeddings().dtype == np.float32
        assert store.read("paths", [7, 3, 7]).tolist() == [batch.paths[i] for i in (7, 3, 7)]
        assert store.read("size", slice(10, 13)).tolist() == batch.size[10:13].tolist()
        assert store.absolute_path(3) == "/more/été/日本/img 3.jpg"
        assert store.absolute_paths()[:2] == ["/photos/été/日本/img 0.jpg",
                                              "/more/été/日本/img 1.jpg"]
        back = store.batch(5, 9)
        np.testing.assert_array_equal(back.embeddings, batch.embeddings[5:9])
        assert back.paths == batch.paths[5:9]
    with h5py.File(h5, "r") as f:  # the public format, read without mgdedup
        assert f.attrs["format"] == "mgdedup-index"
        assert f.attrs["format_version"] == 2
        assert f.attrs["rows"] == len(batch)  # committed rows: written after the data
        assert f["embeddings"].compression is None and f["embeddings"].fletcher32
        assert f["embeddings"].maxshape == (None, DIM)
        assert f["digest"].dtype == np.dtype("S32")
        assert f["paths"].asstr()[0] == batch.paths[0]


def test_append_in_several_batches(h5: Path) -> None:
    batches = [make_batch(n, off) for n, off in ((10, 0), (1, 10), (300, 11), (0, 311))]
    store = IndexStore.create(h5, make_meta())
    for b in batches:
        store.append(b)
    assert len(store) == 311
    assert_rows_equal(IndexStore.open(h5), concat(batches))
    blocks = list(IndexStore.open(h5).iter_embeddings(block_rows=100))
    assert [s for s, _ in blocks] == [0, 100, 200, 300]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]),
                                  concat(batches).embeddings)


def test_remove_rows_keeps_the_rest_in_order(h5: Path) -> None:
    full = make_batch(3000)
    store = IndexStore.create(h5, make_meta())
    for start in range(0, 3000, 100):  # many small appends, as the indexer does
        store.append(full.select(np.arange(start, start + 100)))
    size_before = h5.stat().st_size
    drop = np.r_[0, 5, 5, 2999, np.arange(100, 2000)]
    store.remove_rows(drop)
    keep = np.setdiff1d(np.arange(3000), drop)
    assert len(store) == len(keep)
    assert_rows_equal(store, full.select(keep))
    assert_rows_equal(IndexStore.open(h5), full.select(keep))
    assert h5.stat().st_size < size_before
    assert not h5.with_name("embeddings.h5.tmp").exists()
    store.append(make_batch(2, 5000))  # still usable
    assert len(IndexStore.open(h5)) == len(keep) + 2
    with pytest.raises(IndexError):
        store.remove_rows([len(store)])


def test_compact_shrinks_after_small_appends(h5: Path) -> None:
    store = IndexStore.create(h5, make_meta())
    for k in range(100):
        store.append(make_batch(2, 2 * k))
    before = h5.stat().st_size
    store.compact()
    assert h5.stat().st_size < before
    assert_rows_equal(store, concat([make_batch(2, 2 * k) for k in range(100)]))


def test_append_repairs_columns_left_ragged_by_a_crash(h5: Path) -> None:
    IndexStore.create(h5, make_meta()).append(make_batch(10))
    with h5py.File(h5, "a") as f:  # a writer died after extending two columns
        for name in ("paths", "size"):
            f[name].resize((13,))
    store = IndexStore.open(h5, "a")
    assert len(store) == 10
    store.append(make_batch(5, 10))
    assert_rows_equal(IndexStore.open(h5), concat([make_batch(10), make_batch(5, 10)]))


def test_create_refuses_existing_file(h5: Path) -> None:
    IndexStore.create(h5, make_meta()).append(make_batch(3))
    with pytest.raises(MgdedupError, match="already exists"):
        IndexStore.create(h5, make_meta())
    assert len(IndexStore.open(h5)) == 3


@pytest.mark.parametrize("content", [b"", b"not an index at all\n" * 100])
def test_open_non_hdf5_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "embeddings.h5"
    path.write_bytes(content)
    with pytest.raises(MgdedupError, match="not an mgdedup index"):
        IndexStore.open(path)


def test_open_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(MgdedupError, match="not found"):
        IndexStore.open(tmp_path / "nope.h5")
    with pytest.raises(MgdedupError, match="directory"):
        IndexStore.open(tmp_path)


def test_open_foreign_or_future_hdf5(tmp_path: Path, h5: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(MgdedupError, match="not an mgdedup index"):
        IndexStore.open(other)
    IndexStore.create(h5, make_meta())
    with h5py.File(h5, "a") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(MgdedupError, match="format version 3"):
        IndexStore.open(h5)


def test_open_corrupt_hdf5(h5: Path) -> None:
    IndexStore.create(h5, make_meta()).append(make_batch(500))
    data = h5.read_bytes()
    h5.write_bytes(data[: len(data) // 2])
    with pytest.raises(MgdedupError, match="index file is corrupt"):
        store = IndexStore.open(h5)
        store.embeddings()
        store.read("paths")


def test_ragged_batch_is_refused() -> None:
    good = make_batch(4)
    with pytest.raises(ValueError):
        RowBatch(**{**good.__dict__, "size": good.size[:3]})
    with pytest.raises(ValueError):
        RowBatch(**{**good.__dict__, "digest": ["abc"] * 4})
    with pytest.raises(ValueError):
        RowBatch(**{**good.__dict__, "size": good.size + 0.5})


def test_read_only_store_refuses_writes(h5: Path) -> None:
    IndexStore.create(h5, make_meta())
    with pytest.raises(ValueError, match="read-only"):
        IndexStore.open(h5).append(make_batch(1))


def test_reader_sees_new_rows_after_reopen(h5: Path) -> None:
    IndexStore.create(h5, make_meta()).append(make_batch(20))
    reader = IndexStore.open(h5, "r")
    first = reader.embeddings(0, 5)
    writer = IndexStore.open(h5, "a")  # no handle is held between calls: no lock conflict
    writer.append(make_batch(7, 20))
    writer.close()
    assert len(reader) == 20  # a consistent snapshot ...
    assert len(reader.read("paths")) == 20
    np.testing.assert_array_equal(reader.embeddings(0, 5), first)
    assert len(IndexStore.open(h5)) == 27  # ... new rows on reopen
    reader.refresh()
    assert reader.read("paths")[-1] == make_batch(7, 20).paths[-1]


def test_reader_and_writer_processes_interleave(h5: Path) -> None:
    """A separate process appends batch after batch; this one keeps opening and reading."""
    IndexStore.create(h5, make_meta()).append(make_batch(1))
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = {sys.path!r}
        from tests.test_store import make_batch
        from mgdedup.index.store import IndexStore
        for k in range(20):
            with IndexStore.open({str(h5)!r}, "a") as store:
                store.append(make_batch(50, 1 + 50 * k))
    """)
    root = Path(__file__).resolve().parents[1]
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=root)
    seen = []
    while writer.poll() is None:
        store = IndexStore.open(h5)
        n = len(store)
        assert len(store.read("paths")) == n == len(store.embeddings())
        seen.append(n)
        time.sleep(0.002)
    assert writer.returncode == 0
    assert seen == sorted(seen)
    assert len(IndexStore.open(h5)) == 1001


def test_set_roots(h5: Path) -> None:
    store = IndexStore.create(h5, make_meta(["/a"]))
    store.append(RowBatch(**{**make_batch(2).__dict__, "root": np.zeros(2, np.int32)}))
    store.set_roots(["/a", "/b"])
    assert IndexStore.open(h5).meta.roots == ["/a", "/b"]
    with pytest.raises(ValueError):
        store.set_roots(["relative/path"])


def test_rows_written_but_not_committed_are_never_seen(h5: Path) -> None:
    """A writer killed (or stopped by a full disk) between writing a batch's columns and
    committing it: readers see the committed rows only, and the next append overwrites the
    rest."""
    first, second = make_batch(10), make_batch(5, 10)
    IndexStore.create(h5, make_meta()).append(first)
    with h5py.File(h5, "a") as f:  # what the killed writer left: rows 10-14 resized, zeros
        for name in f:
            shape = list(f[name].shape)
            shape[0] = 15
            f[name].resize(tuple(shape))
    store = IndexStore.open(h5, "a")
    assert len(store) == 10 and store.read("paths").tolist() == first.paths
    store.append(second)
    again = IndexStore.open(h5)
    assert len(again) == 15
    np.testing.assert_array_equal(again.embeddings(10, 15), second.embeddings)
    assert again.read("paths").tolist() == first.paths + second.paths


def test_version_1_index_is_read_and_upgraded_when_written(h5: Path) -> None:
    batch = make_batch(6)
    IndexStore.create(h5, make_meta()).append(batch)
    with h5py.File(h5, "a") as f:  # as mgdedup wrote it: no row count, no hashes
        f.attrs["format_version"] = 1
        del f.attrs["rows"], f["phash"]
    old = IndexStore.open(h5)
    assert len(old) == 6 and old.read("paths").tolist() == batch.paths
    assert (old.read("phash") == np.uint64(2 ** 64 - 1)).all()  # hashes unknown
    new = make_batch(2, 6)
    new.phash = np.array([5, 7], np.uint64)
    IndexStore.open(h5, "a").append(new)
    with h5py.File(h5, "r") as f:
        assert f.attrs["format_version"] == 2 and f.attrs["rows"] == 8
        assert f["phash"][:].tolist() == [2 ** 64 - 1] * 6 + [5, 7]


def test_undecodable_names_are_stored_losslessly(h5: Path) -> None:
    batch = make_batch(3)
    batch.paths[1] = "bad\udcff/\udce9t\udce9.jpg"  # os.fsdecode of latin-1 bytes
    IndexStore.create(h5, make_meta()).append(batch)
    store = IndexStore.open(h5)
    assert store.read("paths").tolist() == batch.paths
    assert os.fsencode(store.read("paths")[1]) == b"bad\xff/\xe9t\xe9.jpg"
    with h5py.File(h5, "r") as f:  # the bytes themselves, as the file system names them
        assert f["paths"][1] == b"bad\xff/\xe9t\xe9.jpg"


def test_reading_many_scattered_rows_matches_numpy_indexing(h5: Path, monkeypatch) -> None:
    """Dense spans are read whole and sparse ones point by point; either way the rows are
    those numpy's own indexing gives, in the order asked, repeats included."""
    import mgdedup.index.store as store_module

    monkeypatch.setattr(store_module, "TAKE_SPAN_ROWS", 64)
    monkeypatch.setattr(store_module, "TAKE_POINTS", 8)
    batch = make_batch(3000)
    with IndexStore.create(h5, make_meta()) as store:
        store.append(batch)
    rng = np.random.default_rng(4)
    dense = rng.integers(100, 400, 500)  # spans at least 1/16 full: read whole
    sparse = rng.choice(3000, 40, replace=False)  # a few rows per span: read by point
    wanted = np.concatenate([sparse, dense, sparse[:5]])
    with IndexStore.open(h5) as store:
        got = store.read("embeddings", wanted)
        np.testing.assert_array_equal(got, batch.embeddings[wanted])
        np.testing.assert_array_equal(store.read("size", wanted), batch.size[wanted])

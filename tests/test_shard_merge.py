"""`index --shard K/N` + `merge`: a partition of the files, and the same index as one run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error, run
from conftest import copy_tree

from mgdedup.errors import MgdedupError
from mgdedup.imaging.scan import scan_images
from mgdedup.index.build import Shard, shard_of
from mgdedup.index.faiss_index import load_index
from mgdedup.index.layout import find_index
from mgdedup.index.merge import merge_indexes
from mgdedup.index.store import IndexMeta, IndexStore, RowBatch

RES = "64"  # small: these tests check bookkeeping, not descriptor quality



def rows_by_path(index_dir: Path) -> dict[str, dict[str, object]]:
    with IndexStore.open(index_dir / "embeddings.h5") as store:
        paths = store.absolute_paths()
        emb = store.embeddings()
        cols = {c: store.read(c) for c in ("size", "mtime_ns", "digest", "width", "height")}
    assert len(set(paths)) == len(paths)
    return {p: {"emb": emb[k], **{c: v[k] for c, v in cols.items()}}
            for k, p in enumerate(paths)}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_shards_partition_the_files(planted, n: int) -> None:
    files, _ = scan_images([planted.folder])
    rels = [f.rel for f in files] + [f"new/extra_{k}.jpg" for k in range(200)]
    owners = [[k for k in range(1, n + 1) if Shard(k, n).owns(rel)] for rel in rels]
    assert all(len(o) == 1 for o in owners)  # every file in exactly one shard
    assert [o[0] for o in owners] == [shard_of(rel, n) for rel in rels]
    if n > 1:  # a hash, not a round robin by position: adding files moves no other file
        assert len({o[0] for o in owners}) == n
        assert [shard_of(r, n) for r in rels[:10]] == [shard_of(r, n) for r in reversed(
            rels[:10])][::-1]


@pytest.mark.parametrize("spec", ["0/3", "4/3", "3", "a/b", "1/0"])
def test_bad_shard_spec_is_a_user_error(spec: str) -> None:
    with pytest.raises(MgdedupError, match="--shard"):
        Shard.parse(spec)


@pytest.fixture(scope="module")
def sharded(planted, tmp_path_factory):
    """The planted folder indexed once whole and once as 3 shards merged (with its own
    config folder: module fixtures run outside the per-test isolated one)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("sharded-config")))
        yield _index_sharded(planted, tmp_path_factory)


def _index_sharded(planted, tmp_path_factory):
    folder = copy_tree(planted.folder, tmp_path_factory.mktemp("sharded") / "photos")
    whole = folder.parent / "whole"
    assert run("index", folder, "-r", RES, "--workers", "0", "--out", whole).exit_code == 0
    for k in (1, 2, 3):
        result = run("index", folder, "-r", RES, "--workers", "0", "--shard", f"{k}/3")
        assert result.exit_code == 0, result.output
    shards = [folder / ".mgdedup" / f"shard-{k}-of-3" for k in (1, 2, 3)]
    result = run("merge", *shards, "--out", folder / ".mgdedup")
    assert result.exit_code == 0, result.output
    assert "merged 3 indexes" in result.output
    remembered = find_index(None, cwd=Path("/"))
    return folder, whole, shards, remembered


def test_shards_then_merge_equal_one_index(sharded) -> None:
    folder, whole, shards, remembered = sharded
    merged_dir = folder / ".mgdedup"
    expected, merged = rows_by_path(whole), rows_by_path(merged_dir)
    assert set(merged) == set(expected) and len(expected) == 40
    for path, row in expected.items():
        other = merged[path]
        np.testing.assert_allclose(other["emb"], row["emb"], atol=1e-5)
        for column in ("size", "mtime_ns", "digest", "width", "height"):
            assert other[column] == row[column], (path, column)
    parts = [rows_by_path(s) for s in shards]
    assert sum(len(p) for p in parts) == 40 and set().union(*parts) == set(expected)
    for k, (part, shard_dir) in enumerate(zip(parts, shards), start=1):
        with IndexStore.open(shard_dir / "embeddings.h5") as store:
            assert store.meta.shard == f"{k}/3"
        root = str(folder.resolve())
        assert all(shard_of(Path(p).relative_to(root).as_posix(), 3) == k for p in part)
    with IndexStore.open(merged_dir / "embeddings.h5") as store:
        assert store.meta.shard is None and len(store) == 40
    assert load_index(merged_dir / "faiss.index").ntotal == 40
    assert remembered == merged_dir.resolve()  # remembered as the last index, like `index`


def test_merged_index_works_and_reindexes_incrementally(sharded) -> None:
    folder, _, _, _ = sharded
    result = run("dedup", "--index", folder / ".mgdedup", "--format", "json")
    assert result.exit_code == 0, result.output
    result = run("index", folder, "-r", RES, "--workers", "0")  # into the merged index
    assert result.exit_code == 0, result.output
    assert "0 indexed" in result.output and "40 unchanged" in result.output


def test_a_shard_index_refuses_another_shard_or_a_whole_run(sharded) -> None:
    folder, _, shards, _ = sharded
    line = one_line_error(run("index", folder, "-r", RES, "--workers", "0", "--shard", "2/3",
                              "--out", shards[0]))
    assert "shard 1/3" in line and "shard 2/3" in line
    line = one_line_error(run("index", folder, "-r", RES, "--workers", "0", "--out",
                              shards[0]))
    assert "unsharded" in line
    # re-running the same shard is incremental
    result = run("index", folder, "-r", RES, "--workers", "0", "--shard", "1/3")
    assert result.exit_code == 0 and "0 indexed" in result.output, result.output


def test_merge_refuses_different_resolutions(sharded, tmp_path: Path) -> None:
    folder, _, shards, _ = sharded
    other = tmp_path / "shard2-at-96"
    result = run("index", folder, "-r", "96", "--workers", "0", "--shard", "2/3", "--out", other)
    assert result.exit_code == 0, result.output
    line = one_line_error(run("merge", shards[0], other, "--out", tmp_path / "m"))
    assert "resolution differs" in line
    assert not (tmp_path / "m" / "embeddings.h5").exists()


# --- merge rules on hand-made indexes --------------------------------------------------------
def fake_index(where: Path, paths: list[str], *, model_id: str = "m", shard: str | None = None,
               roots: tuple[str, ...] = ("/photos",), mtime: int = 1, seed: int = 0) -> Path:
    x = np.random.default_rng(seed).standard_normal((len(paths), 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = IndexMeta(model_id, "m", 224, 3.0, "", 8, list(roots), shard=shard)
    n = len(paths)
    ones = np.ones(n, np.int64)
    with IndexStore.create(where / "embeddings.h5", meta) as store:
        store.append(RowBatch(paths=paths, root=0 * ones, size=ones, mtime_ns=mtime * ones,
                              digest=["0" * 32] * n, width=ones, height=ones, embeddings=x,
                              gem_norm=np.ones(n), white_norm=np.ones(n)))
    return where


def test_merge_refuses_other_models_roots_and_shard_mixups(tmp_path: Path) -> None:
    a = fake_index(tmp_path / "a", ["a.jpg"], shard="1/2")
    cases = {
        "model_id differs": fake_index(tmp_path / "b", ["b.jpg"], model_id="other",
                                       shard="2/2"),
        "different folders": fake_index(tmp_path / "c", ["c.jpg"], roots=("/elsewhere",),
                                        shard="2/2"),
        "given twice": fake_index(tmp_path / "d", ["d.jpg"], shard="1/2"),
        "different ways": fake_index(tmp_path / "e", ["e.jpg"], shard="2/3"),
    }
    for why, other in cases.items():
        line = one_line_error(run("merge", a, other, "--out", tmp_path / "out"))
        assert why in line
    assert not (tmp_path / "out" / "embeddings.h5").exists()


def test_merge_keeps_the_newer_row_and_reports_missing_shards(tmp_path: Path) -> None:
    old = fake_index(tmp_path / "old", ["x.jpg", "y.jpg"], shard="1/3", mtime=5, seed=1)
    new = fake_index(tmp_path / "new", ["y.jpg", "z.jpg"], shard="2/3", mtime=9, seed=2)
    summary = merge_indexes([old, new], tmp_path / "out")
    assert summary.duplicates == 1 and summary.missing_shards == ["3/3"]
    merged = rows_by_path(tmp_path / "out")
    assert sorted(merged) == ["/photos/x.jpg", "/photos/y.jpg", "/photos/z.jpg"]
    with IndexStore.open(new / "embeddings.h5") as store:
        np.testing.assert_array_equal(merged["/photos/y.jpg"]["emb"], store.embeddings(0, 1)[0])
    assert merged["/photos/y.jpg"]["mtime_ns"] == 9
    # an existing index is user data: replaced only when asked
    with pytest.raises(MgdedupError, match="--overwrite"):
        merge_indexes([old, new], tmp_path / "out")
    assert merge_indexes([new, old], tmp_path / "out", overwrite=True).total == 3

"""Evaluation cache: a second run embeds nothing, changed files are embedded again, and the
cache is an ordinary index holding the raw GeM vectors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import photo

from mgdedup.embedding.embedder import Embedder
from mgdedup.evaluation import runner
from mgdedup.evaluation.cache import EmbeddingCache, Item
from mgdedup.index.store import IndexStore
from mgdedup.model.registry import load_model

RESOLUTION = 64


@pytest.fixture
def ukb(tmp_path):
    for n in range(8):
        photo(90, 70, seed=n // 4 + 10 * (n % 4)).save(tmp_path / f"ukbench{n:05d}.jpg")
    return tmp_path


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Images sent through Embedder.gem (every embedding of the cache goes through it)."""
    calls: list[int] = []
    original = Embedder.gem

    def counting(self, tensors):
        calls.append(len(tensors))
        return original(self, tensors)

    monkeypatch.setattr(Embedder, "gem", counting)
    return calls


def test_second_run_embeds_nothing(ukb, tmp_path, counted):
    cache = tmp_path / "cache"
    first = runner.ukb(load_model(), ukb, RESOLUTION, cache_root=cache, workers=0)
    assert sum(counted) == 8 and first["embedded"] == 8
    counted.clear()
    second = runner.ukb(load_model(), ukb, RESOLUTION, cache_root=cache, workers=0)
    assert counted == [] and second["embedded"] == 0
    assert second["score"] == pytest.approx(first["score"], abs=1e-6)

    changed = ukb / "ukbench00005.jpg"
    photo(90, 70, seed=99).save(changed)
    os.utime(changed, ns=(1, 1_000_000_000))
    third = runner.ukb(load_model(), ukb, RESOLUTION, cache_root=cache, workers=0)
    assert sum(counted) == 1 and third["embedded"] == 1


def test_cache_is_an_index_of_raw_gem_vectors(ukb, tmp_path):
    model = load_model()
    paths = sorted(ukb.iterdir())
    cache = EmbeddingCache(model, RESOLUTION, cache_root=tmp_path, workers=0)
    g, ok = cache.gem([Item.file(p) for p in paths])
    assert ok.all()
    expected = np.concatenate([b.gem.numpy() for b in Embedder(model, RESOLUTION, workers=0)
                               .embed_files(paths, digest=False, keep_gem=True)])
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)
    store = IndexStore.open(cache.path)
    meta = store.meta
    assert (meta.model_id, meta.resolution, meta.p, meta.whitening_id, meta.dim) == (
        model.fingerprint(), RESOLUTION, model.p_for(RESOLUTION), "", model.feature_dim)
    assert cache.path.parent.name == f"{model.fingerprint()}-{RESOLUTION}-p{meta.p:g}"
    stored = store.embeddings() * store.read("gem_norm")[:, None]
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)
    assert sorted(store.absolute_paths()) == [str(p) for p in paths]


def test_another_p_has_its_own_cache(ukb, tmp_path, counted):
    model = load_model()
    items = [Item.file(p) for p in sorted(ukb.iterdir())[:2]]
    a = EmbeddingCache(model, RESOLUTION, cache_root=tmp_path, workers=0)
    b = EmbeddingCache(model, RESOLUTION, p=5.0, cache_root=tmp_path, workers=0)
    assert a.path != b.path
    a.gem(items)
    g5, _ = b.gem(items)
    assert sum(counted) == 4 and b.embedded == 2
    g5_again, _ = EmbeddingCache(model, RESOLUTION, p=5.0, cache_root=tmp_path,
                                 workers=0).gem(items)
    assert sum(counted) == 4
    np.testing.assert_allclose(g5_again, g5, rtol=1e-6)


def test_inaug_rerun_embeds_nothing(ukb, tmp_path, counted):
    first = runner.inaug(load_model(), ukb, RESOLUTION, k=2, seed=1, cache_root=tmp_path,
                         workers=0)
    assert sum(counted) == 10 and first["images"] == 10
    counted.clear()
    second = runner.inaug(load_model(), ukb, RESOLUTION, k=2, seed=1, cache_root=tmp_path,
                          workers=0)
    assert counted == [] and second["score"] == first["score"]

"""The light path (no PyTorch: cached ONNX graphs + numpy) gives the PyTorch path's numbers,
is what classify and search of new images use once the cache is warm, and never uses a
cache file that changed since it was written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run
from conftest import photo
from test_startup import imports_of

from mgdedup.embedding.embedder import Embedder
from mgdedup.embedding.light import LightModel, NotCached, arrays_file, remember_arrays
from mgdedup.model.registry import DEFAULT_MODEL, load_model
from mgdedup.queries import classify as classify_module


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Photos of three shapes (three padding classes at s* = 500), and one unreadable file."""
    paths = []
    for k, (w, h) in enumerate([(400, 300), (333, 500), (640, 427)]):
        path = tmp_path / f"p{k}.{'jpg' if k % 2 else 'png'}"
        photo(w, h, seed=k).save(path)
        paths.append(path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return [*paths, tmp_path / "broken.jpg"]


@pytest.mark.parametrize("resolution", [224, 500])
def test_light_descriptors_and_logits_are_the_pytorch_ones(images, resolution) -> None:
    model = load_model(DEFAULT_MODEL)
    expected = list(Embedder(model, resolution, workers=0).embed_files(
        images, digest=False, keep_gem=True))  # also writes the graphs of these shapes
    remember_arrays(DEFAULT_MODEL, model, resolution)
    light = LightModel.load(DEFAULT_MODEL, resolution)
    got = list(light.embed_files(images, keep_gem=True))
    want = {p: (b, k) for b in expected for k, p in enumerate(b.positions)}
    found = {p: (b, k) for b in got for k, p in enumerate(b.positions)}
    assert sorted(found) == sorted(want) == [0, 1, 2]
    assert [e for b in got for e in b.errors][0][0] == 3  # the broken file, with its reason
    for position, (batch, k) in want.items():
        mine, row = found[position]
        np.testing.assert_allclose(mine.descriptors.descriptors[row],
                                   batch.descriptors.descriptors[k], atol=1e-5)
        np.testing.assert_allclose(mine.descriptors.gem_norm[row],
                                   batch.descriptors.gem_norm[k], rtol=1e-5)
        np.testing.assert_allclose(mine.descriptors.white_norm[row],
                                   batch.descriptors.white_norm[k], rtol=1e-5)
        assert mine.sizes[row] == batch.sizes[k] and mine.phashes[row] == batch.phashes[k]
        with torch.inference_mode():
            logits = model.logits(batch.gem[k:k + 1]).numpy()
        np.testing.assert_allclose(light.logits(mine.gem[row:row + 1]), logits,
                                   atol=1e-4, rtol=1e-5)


def test_an_input_shape_without_a_checked_graph_is_not_guessed(images, tmp_path) -> None:
    model = load_model(DEFAULT_MODEL)
    remember_arrays(DEFAULT_MODEL, model, 500)
    odd = tmp_path / "odd.png"
    photo(517, 211, seed=9).save(odd)  # 500 x 204: a padding class no other test meets
    with pytest.raises(NotCached, match="no checked ONNX graph"):
        list(LightModel.load(DEFAULT_MODEL, 500).embed_files([odd]))


def test_classify_of_new_images_needs_no_pytorch_once_cached(images) -> None:
    with pytest.MonkeyPatch.context() as patch:  # the PyTorch path, for reference
        patch.setattr(LightModel, "load", classmethod(lambda cls, *a: (_ for _ in ()).throw(
            NotCached("test"))))
        reference = run("classify", *images[:3], "-k", "3", "--json")
    assert reference.exit_code == 0, reference.output
    heavy, stderr = imports_of("classify", *images[:3], "-k", "3", "--json")
    assert heavy == [], stderr  # the reference run cached what the light path needs
    light = run("classify", *images[:3], "-k", "3", "--json")
    for want, got in zip(json.loads(reference.stdout), json.loads(light.stdout)):
        assert [c["index"] for c in got["top"]] == [c["index"] for c in want["top"]]
        np.testing.assert_allclose([c["prob"] for c in got["top"]],
                                   [c["prob"] for c in want["top"]], atol=1e-5)


def test_search_of_a_new_image_needs_no_pytorch_once_cached(lib, tmp_path) -> None:
    root, index_dir = lib
    query = tmp_path / "query.png"
    photo(300, 300, seed=1).save(query)  # not indexed: embedded
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LightModel, "load", classmethod(lambda cls, *a: (_ for _ in ()).throw(
            NotCached("test"))))
        reference = run("search", query, "--index", index_dir, "-k", "4", "--json")
    assert reference.exit_code == 0, reference.output
    heavy, stderr = imports_of("search", query, "--index", index_dir, "-k", "4", "--json")
    assert heavy == [], stderr
    light = run("search", query, "--index", index_dir, "-k", "4", "--json")
    want = {r["path"]: r["cosine"] for r in json.loads(reference.stdout)[0]["results"]}
    got = {r["path"]: r["cosine"] for r in json.loads(light.stdout)[0]["results"]}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[p] for p in want], list(want.values()), atol=1e-5)


def test_a_changed_arrays_file_is_never_used(images) -> None:
    model = load_model(DEFAULT_MODEL)
    remember_arrays(DEFAULT_MODEL, model, 224)
    path = arrays_file(DEFAULT_MODEL, 224)
    with np.load(path, allow_pickle=False) as data:
        forged = {name: data[name] for name in data.files}
    forged["bias"] = forged["bias"] + np.arange(len(forged["bias"]), dtype=np.float32)
    with open(path, "wb") as out:  # same name, new bytes: the seal no longer matches
        np.savez(out, **forged)
    with pytest.raises(NotCached):
        LightModel.load(DEFAULT_MODEL, 224)
    predictions = classify_module.classify_files(DEFAULT_MODEL, images[:1], 224, k=3)
    with torch.inference_mode():
        batch = next(Embedder(model, 224, workers=0).embed_files(images[:1], keep_gem=True))
        expected = classify_module.top_k(model.logits(batch.gem), model.class_names, 3)
    assert [c for c, _, _ in predictions[0].top] == [c for c, _, _ in expected[0]]
    light = LightModel.load(DEFAULT_MODEL, 224)  # written again by the PyTorch run
    np.testing.assert_array_equal(light.bias, model.trunk.classifier.bias.detach().numpy())

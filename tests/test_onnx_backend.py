"""ONNX Runtime backend: same GeM vectors as PyTorch, on-disk graph cache, fallbacks."""

from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: ONNX backend untested")
pytest.importorskip("onnx", reason="onnx not installed: ONNX graphs cannot be written")

from mgdedup.embedding import onnx_trunk
from mgdedup.embedding.embedder import Embedder, preferred_backend
from mgdedup.embedding.onnx_trunk import OnnxTrunk, padding_class
from mgdedup.errors import MgdedupError
from mgdedup.model.registry import DEFAULT_MODEL, load_model


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path, monkeypatch):
    """Graphs go to a fresh cache directory per test, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "mgdedup" / "onnx"


@pytest.mark.parametrize("height,width", [(224, 224), (375, 500), (500, 375), (333, 500),
                                          (97, 130)])
def test_gem_equals_torch(model, height, width):
    images = list(torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(1)))
    onnx = Embedder(model, 500, backend="onnx", workers=0)
    assert onnx.backend == "onnx"
    got = onnx.gem(images)
    expected = Embedder(model, 500, backend="torch", workers=0).gem(images)
    assert got.shape == expected.shape == (2, model.feature_dim)
    assert onnx.backend == "onnx"  # the class's check passed: no silent fallback
    relative = (got - expected).abs().max() / expected.abs().max()
    assert relative < 1e-4


def test_padding_class_depends_on_size_mod_32():
    assert padding_class(375, 500) == padding_class(375 + 64, 500 - 32)
    assert padding_class(375, 500) != padding_class(376, 500)
    assert padding_class(224, 224) == ((0,) * 5, (0,) * 5)


def test_graph_cached_on_disk_and_reused(model, onnx_cache, monkeypatch):
    first = OnnxTrunk(model.trunk, model.info.trunk)
    first.session(375, 500)
    files = list(onnx_cache.glob("*.onnx"))
    assert len(files) == 1 and files[0].name.startswith(model.fingerprint())
    stamp = files[0].stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("the cached graph should have been reused")
    monkeypatch.setattr(onnx_trunk, "build_lite0_graph", no_export)
    second = OnnxTrunk(model.trunk, model.info.trunk)
    second.session(375 + 32, 500 - 64)  # same padding class: same file
    assert files[0].stat().st_mtime_ns == stamp
    weights = first.weights_path()
    # no temporary file left behind: one graph, the weights it refers to, and their seals
    seals = [p.with_name(p.name + ".blake2b") for p in (*files, weights)]
    assert sorted(onnx_cache.glob("*")) == sorted([*files, weights, *seals])


@pytest.mark.parametrize("victim", ["graph", "weights"])
def test_a_changed_cache_file_is_rebuilt_not_used(model, onnx_cache, victim):
    """A cached graph replaced by another (say one with a constant output) or weights damaged
    on disk: the cache no longer matches what was checked against PyTorch, so it is written
    and checked again, and the features are PyTorch's."""
    images = torch.rand(1, 3, 64, 96)
    trunk = OnnxTrunk(model.trunk, model.info.trunk)
    trunk.forward_features(images)
    graph = trunk.model_path(onnx_trunk.padding_class(64, 96))
    if victim == "graph":  # a valid graph, but of another padding class: other features
        trunk.forward_features(torch.rand(1, 3, 65, 97))
        path = graph
        data = trunk.model_path(onnx_trunk.padding_class(65, 97)).read_bytes()
    else:  # damaged weights: same size, other bytes
        path = trunk.weights_path()
        data = bytearray(path.read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    onnx_trunk._verified.clear()  # a new process: nothing verified yet
    again = OnnxTrunk(model.trunk, model.info.trunk)
    got = again.forward_features(images)
    with torch.inference_mode():
        expected = model.trunk.forward_features(images)
    assert (got - expected).abs().max() < 1e-4
    assert path.read_bytes() != bytes(data)  # written anew


def test_classes_share_one_weights_file(model, onnx_cache):
    trunk = OnnxTrunk(model.trunk, model.info.trunk)
    for height, width in ((375, 500), (500, 375), (97, 130)):
        images = torch.rand(1, 3, height, width)
        got = trunk.forward_features(images)
        with torch.inference_mode():
            expected = model.trunk.forward_features(images)
        assert (got - expected).abs().max() < 1e-4
    graphs = list(onnx_cache.glob("*.onnx"))
    assert len(graphs) == 3
    assert list(onnx_cache.glob("*.weights")) == [trunk.weights_path()]
    # every conv kernel once, as float32 (the classifier is not part of the graph)
    conv_values = sum(m.weight.numel() for m in model.trunk.modules()
                      if isinstance(m, torch.nn.Conv2d))
    assert trunk.weights_path().stat().st_size >= 4 * conv_values
    assert all(g.stat().st_size < 200_000 for g in graphs)  # graphs hold no weights


def test_sessions_are_bounded(model, monkeypatch):
    monkeypatch.setattr(onnx_trunk, "MAX_SESSIONS", 2)
    monkeypatch.setattr(onnx_trunk, "MAX_BATCH", 2)  # 3 images: two ORT calls, one result
    trunk = OnnxTrunk(model.trunk, model.info.trunk)
    for height in (33, 34, 35, 33):
        images = torch.rand(3, 3, height, 40)
        got = trunk.forward_features(images)
        with torch.inference_mode():
            expected = model.trunk.forward_features(images)
        assert (got - expected).abs().max() < 1e-4
    assert len(trunk.sessions) == 2
    assert list(trunk.sessions) == [padding_class(35, 40), padding_class(33, 40)]


def test_damaged_cache_file_is_rewritten(model, onnx_cache):
    trunk = OnnxTrunk(model.trunk, model.info.trunk)
    path = trunk.model_path(padding_class(97, 130))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx model")
    features = trunk.forward_features(torch.rand(1, 3, 97, 130))
    assert features.shape == (1, model.feature_dim, 4, 5)
    assert path.stat().st_size > 1_000  # a real graph replaced the garbage


def test_weights_changed_in_place_get_their_own_graph(model, onnx_cache):
    """A model fine-tuned in place keeps its cached fingerprint; the graph cache must not."""
    other = copy.deepcopy(model.trunk)
    with torch.no_grad():
        other._bn1.bias.add_(0.5)
    OnnxTrunk(other, model.info.trunk).session(97, 130)
    images = torch.rand(1, 3, 97, 130)
    got = OnnxTrunk(model.trunk, model.info.trunk).forward_features(images)
    with torch.inference_mode():
        expected = model.trunk.forward_features(images)
    assert (got - expected).abs().max() < 1e-4
    assert len(list(onnx_cache.glob("*.onnx"))) == 2


def test_graph_failing_its_check_is_not_cached(model, onnx_cache, monkeypatch):
    monkeypatch.setattr(onnx_trunk, "CHECK_TOLERANCE", -1.0)
    with pytest.raises(onnx_trunk.OnnxUnavailable, match="differs from torch"):
        OnnxTrunk(model.trunk, model.info.trunk).session(97, 130)
    assert list(onnx_cache.glob("*")) == []


def test_falls_back_to_torch_without_onnxruntime(model, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING, logger="mgdedup.embedding.embedder"):
        embedder = Embedder(model, 224, workers=0)
    assert embedder.backend == "torch"
    assert "onnxruntime is not installed" in caplog.text
    assert embedder.gem([torch.rand(3, 224, 224)]).shape == (1, model.feature_dim)


def test_failed_check_falls_back_to_torch(model, monkeypatch, caplog):
    monkeypatch.setattr(onnx_trunk, "CHECK_TOLERANCE", -1.0)  # no graph can pass
    images = [torch.rand(3, 97, 130)]
    embedder = Embedder(model, 500, backend="onnx", workers=0)
    with caplog.at_level(logging.WARNING, logger="mgdedup.embedding.embedder"):
        got = embedder.gem(images)
    assert embedder.backend == "torch"
    assert "differs from torch" in caplog.text
    expected = Embedder(model, 500, backend="torch", workers=0).gem(images)
    assert torch.equal(got, expected)


def test_backend_choice(model):
    assert Embedder(model, 224, backend="torch", workers=0).backend == "torch"
    assert Embedder(model, 224, workers=0).backend == "onnx"  # auto, on CPU
    with preferred_backend("torch"):  # how `index --backend` reaches update_index
        assert Embedder(model, 224, workers=0).backend == "torch"
        assert Embedder(model, 224, backend="onnx", workers=0).backend == "onnx"
    with pytest.raises(MgdedupError, match="unknown backend"):
        Embedder(model, 224, backend="tflite", workers=0)
